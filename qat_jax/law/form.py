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
from qat_jax.law.runs import LawError, Runs, param_bytes

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
    `natural(p)`, the parameters as people quote them. `scout_iter`, `polish` and `max_iter`
    are the fitter's defaults for this form (see `fit`). A form with options (`options`, their
    current values) is rebuilt with other values by `variant(**options)`: `with_options`."""

    name: str
    params: tuple[str, ...]
    log_loss: Callable
    grid: Callable  # (runs, pinned) -> np.ndarray [starts, number of unpinned params]
    natural: Callable = lambda p: dict(p)
    doc: str = ""
    scout_iter: int = 5
    polish: int = 8
    max_iter: int = 500
    options: dict = dataclasses.field(default_factory=dict)
    variant: Callable | None = None
    pinned: Callable = lambda runs: {}  # runs -> {param: value} held fixed by the fit
    check_runs: Callable = lambda runs, where: None  # raises LawError for rows it cannot model
    # the options of a law file that names none of them (written before an option was added)
    file_defaults: dict = dataclasses.field(default_factory=dict)

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
