"""Runs tables, what a loss law is fitted to: one row per training run with its parameters N,
tokens of the FP and QAT phases, bits B (16 for full precision), final validation loss and,
optionally, the served model's bytes (docs/configs.md "Model bytes"; the paper's N B / 8 where
absent),
the tokens of the run's final LR cooldown (`D_cool`) and the loss of its schedule-matched
full-precision control (`control_loss`, or `control`: the name of that run in the same table,
as `qat-jax sweep --controls` writes it). Read from a sweep's runs.jsonl or a CSV, and checked
row by row with errors that name the row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import numpy as np

from qat_jax import files
from qat_jax.errors import UserError


class LawError(UserError, ValueError):
    """A runs table or law file that cannot be used, with what is wrong."""


def param_bytes(params, bits):
    """M = N B / 8, the paper's model bytes: every parameter at B bits."""
    return params * bits / 8.0


COLUMNS = ("N", "D_fp", "D_qat", "B", "loss")
BYTES = "model_bytes"  # optional column: the run's served model bytes (default N B / 8)
COOL = "D_cool"  # optional column: tokens of the run's final LR cooldown (NaN: not given)
CONTROL = "control_loss"  # optional: its schedule-matched FP control's loss (NaN: none)
OPTIONAL = (BYTES, COOL, CONTROL)


@dataclasses.dataclass(frozen=True)
class Runs:
    """A table of training runs (float64 arrays of equal length): parameters N, tokens of the
    FP and QAT phases, bits B (16 for full precision), final validation loss, and the model's
    bytes M (given, or N B / 8 where not given: None or NaN); optionally the tokens of the
    final LR cooldown `D_cool` and the loss of the schedule-matched FP control
    `control_loss` (NaN where not given)."""

    N: np.ndarray
    D_fp: np.ndarray
    D_qat: np.ndarray
    B: np.ndarray
    loss: np.ndarray
    model_bytes: np.ndarray | None = None
    D_cool: np.ndarray | None = None
    control_loss: np.ndarray | None = None

    def __post_init__(self):
        rule = param_bytes(np.asarray(self.N, np.float64), np.asarray(self.B, np.float64))
        given = (np.full_like(rule, np.nan) if self.model_bytes is None
                 else np.asarray(self.model_bytes, np.float64))
        object.__setattr__(self, "model_bytes", np.where(np.isnan(given), rule, given))
        for c in (COOL, CONTROL):
            v = getattr(self, c)
            object.__setattr__(self, c, np.full_like(rule, np.nan) if v is None
                               else np.broadcast_to(np.asarray(v, np.float64),
                                                    rule.shape).astype(np.float64))

    def __len__(self):
        return len(self.loss)

    @classmethod
    def from_records(cls, records, where: str = "runs") -> Runs:
        if not records:
            raise LawError(f"{where}: no runs")
        missing = [c for c in COLUMNS if c not in records[0]]
        if missing:
            raise LawError(f"{where}: missing columns {missing}; a runs table has {COLUMNS}")
        try:
            cols = {c: np.array([float(r[c]) for r in records], np.float64) for c in COLUMNS}
        except (KeyError, TypeError, ValueError) as e:
            raise LawError(f"{where}: a row has a missing or non-numeric value ({e})") from None
        optional = {}
        for c in OPTIONAL:
            try:
                optional[c] = np.array([np.nan if r.get(c) in (None, "") else float(r[c])
                                        for r in records], np.float64)
            except (TypeError, ValueError) as e:
                raise LawError(f"{where}: a row has a non-numeric {c} ({e})") from None
        optional[CONTROL] = np.where(np.isnan(optional[CONTROL]),
                                     _control_losses(records, where), optional[CONTROL])
        runs = cls(**cols, **optional)
        runs.check(where)
        return runs

    def check(self, where: str = "runs"):
        for c in (*COLUMNS, BYTES):
            bad = np.flatnonzero(~np.isfinite(getattr(self, c)))
            if bad.size:
                raise LawError(f"{where}: column {c} is NaN or infinite in row {bad[0]}")
        D = self.D_fp + self.D_qat
        for c, ok, rule in ((COOL, (self.D_cool >= 0) & (self.D_cool <= D),
                             "in [0, D_fp + D_qat]"),
                            (CONTROL, self.control_loss > 0, "positive")):
            bad = np.flatnonzero(~(ok | np.isnan(getattr(self, c))))
            if bad.size:
                raise LawError(f"{where}: {c} must be {rule} where given; row {bad[0]} has "
                               f"{c} = {float(getattr(self, c)[bad[0]]):g}")
        for c, ok, rule in (("N", self.N > 0, "positive"), ("loss", self.loss > 0, "positive"),
                            ("B", self.B > 0, "positive"), ("D_fp", self.D_fp >= 0, ">= 0"),
                            ("D_qat", self.D_qat >= 0, ">= 0"),
                            ("D_fp + D_qat", self.D_fp + self.D_qat > 0, "positive"),
                            (BYTES, self.model_bytes > 0, "positive")):
            bad = np.flatnonzero(~ok)
            if bad.size:
                raise LawError(f"{where}: {c} must be {rule}; row {bad[0]} has {c} = "
                               f"{float(_column(self, c)[bad[0]]):g}")

    def take(self, index) -> Runs:
        return Runs(*(getattr(self, c)[index] for c in (*COLUMNS, *OPTIONAL)))


def _control_losses(records, where: str) -> np.ndarray:
    """Each row's control loss from its `control` column: the loss of the full-precision row
    of that name in the same sweep (rows of equal `point`, or the whole table without one);
    NaN where a row names none or its control is not in the table (not finished: the fit then
    reads the law's own FP loss for it). A control that is not a full-precision row is
    refused."""
    fp = {(r.get("point"), r.get("name")): r for r in records}
    out = np.full(len(records), np.nan)
    for i, r in enumerate(records):
        name = r.get("control")
        if name in (None, ""):
            continue
        ctrl = fp.get((r.get("point"), name))
        if ctrl is None:
            continue
        try:
            ok = float(ctrl["B"]) >= 16
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LawError(f"{where}: row {i} names control {name!r}, which is not a "
                           f"full-precision run (a control is the row of that `name` and the "
                           f"same `point` with B >= 16); fix the table's `control` names, or "
                           f"give a numeric {CONTROL} column")
        out[i] = float(ctrl["loss"])
    return out


def _column(runs: Runs, name: str) -> np.ndarray:
    return runs.D_fp + runs.D_qat if name == "D_fp + D_qat" else getattr(runs, name)


def read_runs(path: str | Path) -> Runs:
    """A runs table: runs.jsonl (as `qat-jax sweep` writes it) or a CSV with a header row
    naming at least N, D_fp, D_qat, B, loss."""
    path = Path(path)
    fix = "give the runs.jsonl of `qat-jax sweep` or a CSV"
    if path.is_dir():
        hint = (f" (its runs.jsonl: --runs={path / 'runs.jsonl'})"
                if (path / "runs.jsonl").is_file() else "")
        raise LawError(f"{path} is a directory{hint}; {fix}")
    if not path.is_file():
        raise LawError(f"{path}: no such file; {fix}")
    if path.suffix == ".csv":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LawError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                           f"{fix}") from None
        records = list(csv.DictReader(io.StringIO(text)))
    else:
        try:
            records = files.read_jsonl(path, fix)
        except files.SavedFileError as e:
            raise LawError(str(e)) from None
    return Runs.from_records(records, str(path))
