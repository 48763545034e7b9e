"""Runs tables, what a loss law is fitted to: one row per training run with its parameters N,
tokens of the FP and QAT phases, bits B (16 for full precision), final validation loss and,
optionally, the served model's bytes (README "Model bytes"; the paper's N B / 8 where absent).
Read from a sweep's runs.jsonl or a CSV, and checked row by row with errors that name the row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from qat_jax.errors import UserError


class LawError(UserError, ValueError):
    """A runs table or law file that cannot be used, with what is wrong."""


def param_bytes(params, bits):
    """M = N B / 8, the paper's model bytes: every parameter at B bits."""
    return params * bits / 8.0


COLUMNS = ("N", "D_fp", "D_qat", "B", "loss")
BYTES = "model_bytes"  # optional column: the run's served model bytes (default N B / 8)


@dataclasses.dataclass(frozen=True)
class Runs:
    """A table of training runs (float64 arrays of equal length): parameters N, tokens of the
    FP and QAT phases, bits B (16 for full precision), final validation loss, and the model's
    bytes M (given, or N B / 8 where not given: None or NaN)."""

    N: np.ndarray
    D_fp: np.ndarray
    D_qat: np.ndarray
    B: np.ndarray
    loss: np.ndarray
    model_bytes: np.ndarray | None = None

    def __post_init__(self):
        rule = param_bytes(np.asarray(self.N, np.float64), np.asarray(self.B, np.float64))
        given = (np.full_like(rule, np.nan) if self.model_bytes is None
                 else np.asarray(self.model_bytes, np.float64))
        object.__setattr__(self, "model_bytes", np.where(np.isnan(given), rule, given))

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
        try:
            given = np.array([np.nan if r.get(BYTES) in (None, "") else float(r[BYTES])
                              for r in records], np.float64)
        except (TypeError, ValueError) as e:
            raise LawError(f"{where}: a row has a non-numeric {BYTES} ({e})") from None
        runs = cls(**cols, model_bytes=given)
        runs.check(where)
        return runs

    def check(self, where: str = "runs"):
        for c in (*COLUMNS, BYTES):
            bad = np.flatnonzero(~np.isfinite(getattr(self, c)))
            if bad.size:
                raise LawError(f"{where}: column {c} is NaN or infinite in row {bad[0]}")
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
        return Runs(*(getattr(self, c)[index] for c in (*COLUMNS, BYTES)))


def _column(runs: Runs, name: str) -> np.ndarray:
    return runs.D_fp + runs.D_qat if name == "D_fp + D_qat" else getattr(runs, name)


def read_runs(path: str | Path) -> Runs:
    """A runs table: runs.jsonl (as `qat-jax sweep` writes it) or a CSV with a header row
    naming at least N, D_fp, D_qat, B, loss."""
    path = Path(path)
    if not path.is_file():
        raise LawError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LawError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); give the "
                       f"runs.jsonl of `qat-jax sweep` or a CSV") from None
    if path.suffix == ".csv":
        records = list(csv.DictReader(io.StringIO(text)))
    else:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise LawError(f"{path}: not JSON lines ({e}); give a .jsonl or a .csv") from None
    return Runs.from_records(records, str(path))
