"""The law registry (METHOD.md section 3): a law is a registered `Form`, a plain function of a
run's (N, D_fp, D_qat, B, M, D_cool, L_ctrl) with named parameters and its fitter's starts; a
`Law` is a fitted one, saved and loaded as law.json. The fitter is law/fitter.py; the forms live
in law/paper.py (the paper's), law/sched.py and law/wsd.py (the schedule-aware ones)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from qat_jax import files
from qat_jax.law.runs import COOL, LawError, Runs, param_bytes

LN2 = math.log(2.0)
FP_BITS = 16.0  # B of a full-precision run in a runs table
FP_COOLDOWN = 0.2  # [ours] the cooldown share of a full-precision run that names none


@dataclasses.dataclass(frozen=True)
class Form:
    """A loss law: `log_loss(p, N, D_fp, D_qat, B, M, D_cool, L_ctrl)` (M the model's bytes,
    D_cool the tokens of the final LR cooldown, L_ctrl the loss of the run's schedule-matched
    FP control or NaN: forms that do not model them ignore them) with p a dict of
    named parameters (fitted as they are: positive coefficients enter as logs), its start
    points for the fitter, and
    `natural(p)`, the parameters as people quote them. The fitter hands `grid` and `pinned`
    its own `fit`, so that a form whose starts come from a fit of another form (its FP part)
    needs no import of the fitter. `scout_iter`, `polish` and `max_iter`
    are the fitter's defaults for this form (see `fit`). A form with options (`options`, their
    current values) is rebuilt with other values by `variant(**options)`: `with_options`."""

    name: str
    params: tuple[str, ...]
    log_loss: Callable
    # (runs, pinned, fit) -> np.ndarray [starts, number of unpinned params]; `fit` is the
    # fitter's, for a grid placed by a fit of another form (the FP part's)
    grid: Callable
    natural: Callable = lambda p: dict(p)
    doc: str = ""
    scout_iter: int = 5
    polish: int = 8
    max_iter: int = 500
    options: dict = dataclasses.field(default_factory=dict)
    variant: Callable | None = None
    pinned: Callable = lambda runs, fit: {}  # (runs, fit) -> {param: value} held fixed
    check_runs: Callable = lambda runs, where: None  # raises LawError for rows it cannot model
    # the options of a law file that names none of them (written before an option was added)
    file_defaults: dict = dataclasses.field(default_factory=dict)
    # whether its natural E bounds its loss from below (`planner.doubts`); not in a form that
    # subtracts a cooldown's annealing gain from Chinchilla's loss, whose E is the loss at
    # constant LR only
    floor: bool = True

    @property
    def key(self) -> tuple[str, str]:
        """What tells this form from every other: its name and its options' values (the key
        of the compiled functions the fitter and `Law` keep)."""
        return self.name, json.dumps(self.options, sort_keys=True, default=str)

    def with_options(self, **options) -> Form:
        """This form with some options changed (law files and `qat-jax fit --law_options`)."""
        if not options:
            return self
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            have = ", ".join(f"{k} (now {v!r})" for k, v in self.options.items()) or "none"
            raise LawError(f"the {self.name!r} law has no option {unknown[0]!r}; its options: "
                           f"{have}")
        return self.variant(**{**self.options, **options})


# [ours] The units of N and D in the schedule-aware laws' size-scaled terms (any would do;
# these keep the logs of the coefficients near 0 at the study's scale).
D_UNIT, N_UNIT = 1e6, 1e5
QAT_STARTS = 256  # random starts of a QAT law's QAT terms (its FP part starts from a fit)


FORMS: dict[str, Form] = {}


def register(form: Form) -> Form:
    """Make `form` available by name (to `fit`, law files and `qat-jax fit --law`)."""
    FORMS[form.name] = form
    return form


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise LawError(f"unknown law form {name!r}; registered: {sorted(FORMS)}")
    return FORMS[name]



def positive_option(form: str, name: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (x > 0 and math.isfinite(x)):
        raise LawError(f"{form} law: {name} must be a positive number (got {value!r})")
    return x


def bool_option(form: str, name: str, value) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise LawError(f"{form} law: {name} must be true or false (got {value!r})")
    return value


def choice_option(form: str, name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise LawError(f"{form} law: {name} must be one of {choices} (got {value!r})")
    return value



def natural_exp(v: float) -> float:
    """exp(v) for a law's natural parameters: inf past float's range (a degenerate fit's
    coefficient, which a report shows rather than crashes on)."""
    return math.exp(v) if v < 709.0 else math.inf


def default_cooldown(D_fp, D_qat, B):
    """The tokens of a run's final LR cooldown where none is given: the QAT phase for a fused
    QAT run (the paper's recipe), FP_COOLDOWN of the tokens for a full-precision one."""
    qat = (np.asarray(B) < FP_BITS) & (np.asarray(D_qat) > 0)
    return np.where(qat, D_qat, FP_COOLDOWN * (np.asarray(D_fp) + np.asarray(D_qat)))


_COMPILED: dict = {}


def _compiled_log_loss(form: Form):
    """`form.log_loss`, jit-compiled once per form (a law is evaluated thousands of times by
    the planner's searches; op by op, each call dispatches its every operation)."""
    if form.key not in _COMPILED:
        _COMPILED[form.key] = jax.jit(form.log_loss)
    return _COMPILED[form.key]


@dataclasses.dataclass
class Law:
    """A fitted law: its form and parameters, callable as law(N, D_fp, D_qat, B[, M[, D_cool]])
    -> loss (M, the model's bytes, defaults to N B / 8; D_cool, `default_cooldown`)."""

    form: Form
    params: dict[str, float]
    fit: dict = dataclasses.field(default_factory=dict)  # objective, r2, rmse, ...

    def log_loss(self, N, D_fp, D_qat, B, M=None, D_cool=None):
        """log L; D_cool (tokens of the final LR cooldown, for forms that model it) defaults
        to the paper's fused recipe, the QAT phase (D_qat) for a QAT run and FP_COOLDOWN of
        the tokens for a full-precision one."""
        args = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (N, D_fp, D_qat, B)))
        shape = args[0].shape
        M = param_bytes(args[0], args[3]) if M is None else M
        if D_cool is None:
            D_cool = default_cooldown(args[1], args[2], args[3])
        M, D_cool = (np.broadcast_to(np.asarray(x, np.float64), shape) for x in (M, D_cool))
        p = {k: np.float64(v) for k, v in self.params.items()}
        with jax.enable_x64(True):
            return np.asarray(_compiled_log_loss(self.form)(p, *args, M, D_cool,
                                                            np.full(shape, np.nan)))

    def __call__(self, N, D_fp, D_qat, B, M=None, D_cool=None):
        return np.exp(self.log_loss(N, D_fp, D_qat, B, M, D_cool))

    def natural(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.form.natural(self.params).items()}

    def save(self, path: str | Path, digits: int | None = None):
        """law.json; with `digits`, every number rounded to that many significant digits (a
        file that is the same wherever the fit ran, its last bits aside)."""
        obj = {"form": self.form.name, "options": self.form.options, "params": self.params,
               "natural": self.natural(), "fit": self.fit}
        if digits is not None:
            obj = _rounded(obj, digits)
        files.atomic_write(path, json.dumps(obj, indent=2) + "\n")


def _rounded(x, digits: int):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return x


def load_law(path: str | Path) -> Law:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
        form = get_form(obj["form"])
        form = form.with_options(**{**form.file_defaults, **obj.get("options", {})})
        params = {k: float(obj["params"][k]) for k in form.params}
    except FileNotFoundError:
        raise LawError(f"{path}: no such law file (write one with `qat-jax fit`)") from None
    except LawError as e:
        raise LawError(f"{path}: {e}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError,
            UnicodeDecodeError, IsADirectoryError) as e:
        raise LawError(f"{path}: not a law file written by `qat-jax fit` ({e})") from None
    bad = [k for k, v in params.items() if not math.isfinite(v)]
    if bad:
        raise LawError(f"{path}: parameters {', '.join(bad)} are not finite numbers; a law "
                       f"with them predicts nothing: fit it again (`qat-jax fit`)")
    return Law(form, params, obj.get("fit", {}))


def predict(law: Law, runs: Runs) -> np.ndarray:
    """The law's loss for each run of the table, at its own cooldown where the table gives
    one (never its control's loss: a prediction)."""
    cool = np.where(np.isnan(runs.D_cool), default_cooldown(runs.D_fp, runs.D_qat, runs.B),
                    runs.D_cool)
    return law(runs.N, runs.D_fp, runs.D_qat, runs.B, runs.model_bytes, cool)


# ----------------------------------------------------------------------------- shared by forms


def fp_runs(runs: Runs) -> Runs:
    return runs.take(runs.B >= FP_BITS)


def pinner(fp_form: str | Form):
    """The paper's FP loss regularisation: the FP part (`fp_form`: Chinchilla's E, A, alpha,
    B, beta, or with the schedule's terms) is fitted to the full-precision runs alone and then
    held fixed, so the QAT terms explain only what quantization adds."""

    def pin(runs: Runs, fit) -> dict[str, float]:
        form = get_form(fp_form) if isinstance(fp_form, str) else fp_form
        fp, n = fp_runs(runs), len(form.params)
        if len(fp) <= n:
            raise LawError(f"pinning the FP part ({form.name}) to the full-precision runs needs "
                           f"more than {n} of them (rows with B >= {FP_BITS:g}); this table "
                           f"has {len(fp)}. Add FP runs, or fit unpinned (law option "
                           f"pin_fp=false)")
        return fit(fp, form).params

    return pin


def qat_grid_for(fp_form: str | Form, params: tuple[str, ...], ranges: dict):
    def grid(runs: Runs, pinned: dict, fit) -> np.ndarray:
        """Start points of the unpinned parameters: the QAT terms at QAT_STARTS seeded random
        points of `ranges`; unpinned, the FP part starts from a fit of `fp_form` (to the FP
        runs when there are enough, else to all runs)."""
        base = pinned
        if not pinned:
            form = get_form(fp_form) if isinstance(fp_form, str) else fp_form
            fp = fp_runs(runs)
            enough = len(fp) >= 2 * len(form.params)
            base = fit(fp if enough else runs, form).params
        rng = np.random.default_rng(0)
        names = [n for n in params if n not in pinned]
        starts = np.empty((QAT_STARTS, len(names)))
        for i, name in enumerate(names):
            if name in base:
                starts[:, i] = base[name]
            else:
                lo, hi = ranges[name]
                starts[:, i] = rng.uniform(lo, hi, QAT_STARTS)
        return starts

    return grid


def check_qat_runs(runs: Runs, where: str):
    """A B-bit row without QAT tokens is post-training quantization, which this law does not
    model (its delta is infinite at S_qat = 0): refused, naming the row."""
    if not np.any((runs.B < FP_BITS) & (runs.D_qat > 0)):
        raise LawError(f"{where}: no quantized run with QAT tokens (B < {FP_BITS:g} bits, "
                       f"D_qat > 0) among its {len(runs)} rows; the QAT law's terms are "
                       f"fitted to such runs: add them, or fit the FP runs with "
                       f"--law=chinchilla")
    ptq = np.flatnonzero((runs.B < FP_BITS) & (runs.D_qat <= 0))
    if ptq.size:
        i = int(ptq[0])
        raise LawError(f"{where}: row {i} has B = {runs.B[i]:g} bits and D_qat = 0 (post-"
                       f"training quantization, {ptq.size} such rows); the QAT law models "
                       f"quantized runs with QAT tokens only (its delta is infinite at "
                       f"S_qat = 0): drop those rows or give them D_qat > 0")


def needs_cooldown(form: str):
    def check(runs: Runs, where: str):
        bad = np.flatnonzero(np.isnan(runs.D_cool))
        if bad.size:
            raise LawError(f"{where}: the {form!r} law models the LR schedule and needs each "
                           f"run's {COOL} (tokens of its final LR cooldown; `qat-jax sweep` "
                           f"writes it); row {bad[0]} has none ({bad.size} rows). Give the "
                           f"column, or fit a law without a schedule term (--law=qat)")

    return check
