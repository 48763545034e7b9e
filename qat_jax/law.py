"""Scaling-law maths (METHOD.md sections 2 and 3): tokens per parameter byte and the
closed-form optimal QAT fraction f*(S) of Dremov et al. (ICLR 2026).

S = D / M is a run's total tokens over the size of its B-bit model in bytes. The paper takes
M = N B / 8 (every parameter at B bits); a runs table may give each run's served bytes instead
(column `model_bytes`, as `qat-jax sweep` writes it: model.served_bytes, README "Model bytes"),
and the law then reads those. The paper
fits one curve for the loss-optimal QAT fraction over all model sizes and bit widths,
f*(S) = exp(-a / ln S) with a = 6.7297 (mean absolute error 0.091). It is defined for S > 1
only: at S <= 1, ln S <= 0 and the formula leaves [0, 1).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The runs tables live in runs.py; their names are part of this module's API too.
from qat_jax import files
from qat_jax.runs import (  # noqa: F401
    BYTES,
    COLUMNS,
    CONTROL,
    COOL,
    OPTIONAL,
    LawError,
    Runs,
    param_bytes,
    read_runs,
)

CLOSED_FORM_A = 6.7297  # a of f*(S) = exp(-a / ln S) [paper]


def tokens_per_param_byte(tokens: float, params: float, bits: float,
                          model_bytes: float | None = None) -> float:
    """S = D / M, M = `model_bytes` if given, else N B / 8."""
    if params <= 0 or bits <= 0 or (model_bytes is not None and model_bytes <= 0):
        raise ValueError(f"S needs N > 0, B > 0 and model bytes > 0 (got N={params}, B={bits}, "
                         f"model_bytes={model_bytes})")
    return tokens / (param_bytes(params, bits) if model_bytes is None else model_bytes)


def closed_form_fraction(S: float, a: float = CLOSED_FORM_A) -> float:
    """f*(S) = exp(-a / ln S), the paper's loss-optimal QAT fraction; ValueError for S <= 1."""
    if not S > 1.0:
        raise ValueError(f"f*(S) = exp(-a / ln S) is defined for S > 1 tokens per parameter "
                         f"byte only; this budget has S = {S:.4g}")
    return math.exp(-a / math.log(S))


# ----------------------------------------------------------------------------- law forms

LN2 = math.log(2.0)
FP_BITS = 16.0  # B of a full-precision run in a runs table
S_FP_FLOOR = 1e-3  # [ours] default floor of S_fp in the QAT law (QAT from scratch: S_fp = 0)


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


def _product(*axes) -> np.ndarray:
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))


def _chin_terms(p, N, D):
    return [jnp.broadcast_to(p["e"], jnp.shape(N)), p["a"] - p["alpha"] * jnp.log(N),
            p["b"] - p["beta"] * jnp.log(D)]


def _chin_natural(p):
    return {"E": math.exp(p["e"]), "A": math.exp(p["a"]), "alpha": p["alpha"],
            "B": math.exp(p["b"]), "beta": p["beta"]}


# Chinchilla (Hoffmann et al. 2022) in log-sum-exp form, as Epoch AI's replication fits it:
# log L = LSE(a - alpha log N, b - beta log D, e); D is all tokens of the run.
CHINCHILLA_GRID = _product(np.arange(0, 26, 5.0), np.arange(0, 26, 5.0),
                           np.arange(-1, 1.01, 0.5), np.arange(0, 2.01, 0.5),
                           np.arange(0, 2.01, 0.5))  # a, b, e, alpha, beta: 4,500 starts
chinchilla = register(Form(
    "chinchilla", ("a", "b", "e", "alpha", "beta"),
    lambda p, N, D_fp, D_qat, B, M, D_cool, L_ctrl: jax.nn.logsumexp(
        jnp.stack(_chin_terms(p, N, D_fp + D_qat)), axis=0),
    lambda runs, pinned: CHINCHILLA_GRID, _chin_natural,
    "E + A / N^alpha + B / D^beta, D = D_fp + D_qat"))

QAT_PARAMS = ("a", "b", "e", "alpha", "beta", "log_theta", "kappa", "log_phi", "chi", "psi",
              "omega", "log_lambda", "mu", "nu", "xi", "rho")
# Ranges of the QAT terms' start points (sampled; the Chinchilla part starts from a fit).
QAT_START_RANGES = {"log_theta": (-5, 1), "kappa": (0.2, 1.5), "log_phi": (-3, 3),
                    "chi": (0.0, 1.5), "psi": (0.0, 0.5), "omega": (0.0, 1.0),
                    "log_lambda": (-3, 3), "mu": (0.0, 1.5), "nu": (0.0, 0.5),
                    "xi": (-0.5, 0.5), "rho": (0.0, 1.0)}
QAT_STARTS = 256


CHINCHILLA_TOKENS = ("total", "fp")  # which D the QAT law's Chinchilla part reads


def _delta_terms(p, N, D_fp, D_qat, B, M, s_fp_floor: float):
    """The paper's QAT terms in log form (METHOD.md section 3), S_qat = D_qat / M and
    S_fp = D_fp / M (M the model's bytes): theta 2^-kappa B,
    phi 2^-chi B / (N^psi S_qat^omega) and lambda 2^-mu B / (N^nu S_fp^xi S_qat^rho), each
    -inf (no term) for a run without QAT; and the mask of B-bit runs without QAT tokens (post-
    training quantization: an infinite loss under these terms). [ours] S_fp is floored at
    `s_fp_floor`, so QAT from scratch (S_fp = 0) stays finite and the law continuous as
    f -> 1."""
    quantized = B < FP_BITS
    qat = quantized & (D_qat > 0)
    log_bytes = jnp.log(M)
    log_s_qat = jnp.log(jnp.where(qat, D_qat, 1.0)) - log_bytes  # safe log: where-masked
    log_s_fp = jnp.log(jnp.maximum(D_fp / M, s_fp_floor))
    log_n, off = jnp.log(N), -jnp.inf
    terms = [
        jnp.where(qat, p["log_theta"] - p["kappa"] * B * LN2, off),
        jnp.where(qat, p["log_phi"] - p["chi"] * B * LN2 - p["psi"] * log_n
                  - p["omega"] * log_s_qat, off),
        jnp.where(qat, p["log_lambda"] - p["mu"] * B * LN2 - p["nu"] * log_n
                  - p["xi"] * log_s_fp - p["rho"] * log_s_qat, off),
    ]
    return terms, quantized & ~qat


def _qat_log_loss_fn(chinchilla_tokens: str, s_fp_floor: float):
    def log_loss(p, N, D_fp, D_qat, B, M, D_cool=None, L_ctrl=None):
        """The paper's law, log L = log(L_chin(N, D) + delta) with delta the QAT terms
        (`_delta_terms`; 0 for a full-precision run, B >= 16); with chinchilla_tokens="fp",
        Chinchilla's D = D_fp, floored at S_fp = s_fp_floor [ours]."""
        D = (D_fp + D_qat if chinchilla_tokens == "total"
             else jnp.maximum(D_fp, s_fp_floor * M))
        delta, ptq = _delta_terms(p, N, D_fp, D_qat, B, M, s_fp_floor)
        log_loss = jax.nn.logsumexp(jnp.stack(_chin_terms(p, N, D) + delta), axis=0)
        return jnp.where(ptq, jnp.inf, log_loss)

    return log_loss


def _fp_runs(runs: Runs) -> Runs:
    return runs.take(runs.B >= FP_BITS)


def _pinner(fp_form: str | Form):
    """The paper's FP loss regularisation: the FP part (`fp_form`: Chinchilla's E, A, alpha,
    B, beta, or with the schedule's terms) is fitted to the full-precision runs alone and then
    held fixed, so the QAT terms explain only what quantization adds."""

    def pin(runs: Runs) -> dict[str, float]:
        form = get_form(fp_form) if isinstance(fp_form, str) else fp_form
        fp, n = _fp_runs(runs), len(form.params)
        if len(fp) <= n:
            raise LawError(f"pinning the FP part ({form.name}) to the full-precision runs needs "
                           f"more than {n} of them (rows with B >= {FP_BITS:g}); this table "
                           f"has {len(fp)}. Add FP runs, or fit unpinned (law option "
                           f"pin_fp=false)")
        return fit(fp, form).params

    return pin


def _qat_grid_for(fp_form: str | Form, params: tuple[str, ...]):
    def grid(runs: Runs, pinned: dict) -> np.ndarray:
        """Start points of the unpinned parameters: the QAT terms at QAT_STARTS seeded random
        points of QAT_START_RANGES; unpinned, the FP part starts from a fit of `fp_form` (to
        the FP runs when there are enough, else to all runs)."""
        base = pinned
        if not pinned:
            form = get_form(fp_form) if isinstance(fp_form, str) else fp_form
            fp = _fp_runs(runs)
            enough = len(fp) >= 2 * len(form.params)
            base = fit(fp if enough else runs, form).params
        rng = np.random.default_rng(0)
        names = [n for n in params if n not in pinned]
        starts = np.empty((QAT_STARTS, len(names)))
        for i, name in enumerate(names):
            if name in base:
                starts[:, i] = base[name]
            else:
                lo, hi = QAT_START_RANGES[name]
                starts[:, i] = rng.uniform(lo, hi, QAT_STARTS)
        return starts

    return grid


def _qat_check_runs(runs: Runs, where: str):
    """A B-bit row without QAT tokens is post-training quantization, which this law does not
    model (its delta is infinite at S_qat = 0): refused, naming the row."""
    ptq = np.flatnonzero((runs.B < FP_BITS) & (runs.D_qat <= 0))
    if ptq.size:
        i = int(ptq[0])
        raise LawError(f"{where}: row {i} has B = {runs.B[i]:g} bits and D_qat = 0 (post-"
                       f"training quantization, {ptq.size} such rows); the QAT law models "
                       f"quantized runs with QAT tokens only (its delta is infinite at "
                       f"S_qat = 0): drop those rows or give them D_qat > 0")


def _qat_natural(p):
    out = _chin_natural(p)
    out.update({k: (math.exp(v) if k.startswith("log_") else v) for k, v in p.items()
                if k not in ("a", "b", "e", "alpha", "beta")})
    return {k.removeprefix("log_"): v for k, v in out.items()}


def _positive_option(form: str, name: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (x > 0 and math.isfinite(x)):
        raise LawError(f"{form} law: {name} must be a positive number (got {value!r})")
    return x


def _bool_option(form: str, name: str, value) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise LawError(f"{form} law: {name} must be true or false (got {value!r})")
    return value


def _choice_option(form: str, name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise LawError(f"{form} law: {name} must be one of {choices} (got {value!r})")
    return value


def qat_form(chinchilla_tokens: str = "total", s_fp_floor: float = S_FP_FLOOR,
             pin_fp: bool = True) -> Form:
    """The paper's QAT law with our choices as options: which tokens the Chinchilla part
    counts ("total" = D_fp + D_qat, or "fp" = D_fp), the floor of S_fp (> 0), and whether the
    full-precision runs pin the Chinchilla part (the paper's FP loss regularisation; False fits
    all 16 parameters jointly)."""
    if chinchilla_tokens not in CHINCHILLA_TOKENS:
        raise LawError(f"qat law: chinchilla_tokens must be one of {CHINCHILLA_TOKENS} "
                       f"(got {chinchilla_tokens!r})")
    s_fp_floor = _positive_option("qat", "s_fp_floor", s_fp_floor)
    pin_fp = _bool_option("qat", "pin_fp", pin_fp)
    d = "D_fp + D_qat" if chinchilla_tokens == "total" else "D_fp"
    pinned = "pinned by the FP runs" if pin_fp else "fitted jointly"
    return Form("qat", QAT_PARAMS, _qat_log_loss_fn(chinchilla_tokens, s_fp_floor),
                _qat_grid_for("chinchilla", QAT_PARAMS),
                _qat_natural, f"L_chin(N, {d}) ({pinned}) + QAT terms (METHOD.md section 3), "
                f"S_fp >= {s_fp_floor:g}", scout_iter=50, polish=32, max_iter=2000,
                options={"chinchilla_tokens": chinchilla_tokens, "s_fp_floor": s_fp_floor,
                         "pin_fp": pin_fp},
                variant=qat_form, pinned=_pinner("chinchilla") if pin_fp else (lambda runs: {}),
                check_runs=_qat_check_runs)


qat = register(qat_form())


# ----------------------------------------------------------------------------- schedule-aware

# [ours] A law with a term for the LR schedule (METHOD.md section 3b). With the paper's fused
# cooldown, the QAT fraction f is also the length of the LR cooldown, and an FP run's loss
# depends on that length: its Chinchilla part then reads effective tokens (the area under the
# LR schedule, peak LR = 1: a linear cooldown to ~0 over the last D_cool tokens leaves
# D - D_cool / 2) less the annealing gain of the cooldown, which saturates once the cooldown
# is long against a window of w tokens: C g(D_cool / w), g(x) = 1 - (1 - e^-x) / x (the
# momentum-decayed annealing area of a linear decay, after Tissue et al. 2024, "Scaling Law
# with Learning Rate Annealing"). The gain is C itself ("additive") or a share C of the
# Chinchilla loss ("relative").
ANNEAL = ("additive", "relative")
SCHED_FP_PARAMS = ("a", "b", "e", "alpha", "beta", "log_c", "log_w")
SCHED_TARGETS = ("penalty", "loss")
FP_COOLDOWN = 0.2  # [ours] the cooldown share of a full-precision run that names none
QAT_START_RANGES.update({"log_c": (-4.0, -1.0), "log_w": (9.0, 14.0)})


def _anneal_gain(p, D_cool):
    x = D_cool * jnp.exp(-p["log_w"])
    safe = jnp.maximum(x, 1e-3)
    return jnp.where(x < 1e-3, x / 2 - x * x / 6, 1.0 + jnp.expm1(-safe) / safe)


def _sched_fp_log_fn(anneal: str):
    def log_fp(p, N, D, D_cool):
        """log L_fp(N, D, D_cool): Chinchilla at D - D_cool / 2 less the annealing gain."""
        log_chin = jax.nn.logsumexp(jnp.stack(_chin_terms(p, N, D - 0.5 * D_cool)), axis=0)
        gain = jnp.exp(p["log_c"]) * _anneal_gain(p, D_cool)
        if anneal == "relative":
            return log_chin + jnp.log1p(-jnp.minimum(gain, 1.0 - 1e-9))
        return jnp.log(jnp.maximum(jnp.exp(log_chin) - gain, 1e-9))

    return log_fp


def _sched_natural(p):
    out = _chin_natural(p)
    out.update({"C": math.exp(p["log_c"]), "w": math.exp(p["log_w"])})
    return out


def _needs_cooldown(form: str):
    def check(runs: Runs, where: str):
        bad = np.flatnonzero(np.isnan(runs.D_cool))
        if bad.size:
            raise LawError(f"{where}: the {form!r} law models the LR schedule and needs each "
                           f"run's {COOL} (tokens of its final LR cooldown; `qat-jax sweep` "
                           f"writes it); row {bad[0]} has none ({bad.size} rows). Give the "
                           f"column, or fit a law without a schedule term (--law=qat)")

    return check


def _sched_fp_grid(runs: Runs, pinned: dict) -> np.ndarray:
    chin = fit(runs, "chinchilla").params  # no schedule term: where its valley lies
    base = np.array([chin[k] for k in ("a", "b", "e", "alpha", "beta")])
    rng = np.random.default_rng(0)
    jitter = rng.normal(0.0, [2.0, 2.0, 0.3, 0.2, 0.2], (QAT_STARTS, 5))
    jitter[0] = 0.0
    extra = np.stack([rng.uniform(*QAT_START_RANGES[k], QAT_STARTS)
                      for k in ("log_c", "log_w")], -1)
    return np.concatenate([base + jitter, extra], -1)


def sched_fp_form(anneal: str = "additive") -> Form:
    """The full-precision part of the schedule-aware law on its own (fitted to FP runs)."""
    anneal = _choice_option("chinchilla_schedule", "anneal", anneal, ANNEAL)
    log_fp = _sched_fp_log_fn(anneal)
    return Form("chinchilla_schedule", SCHED_FP_PARAMS,
                lambda p, N, D_fp, D_qat, B, M, D_cool, L_ctrl: log_fp(p, N, D_fp + D_qat,
                                                                      D_cool),
                _sched_fp_grid, _sched_natural,
                f"Chinchilla at D - D_cool / 2, less the cooldown's {anneal} annealing gain",
                scout_iter=50, polish=16, max_iter=2000, options={"anneal": anneal},
                variant=sched_fp_form, check_runs=_needs_cooldown("chinchilla_schedule"))


chinchilla_schedule = register(sched_fp_form())
QAT_SCHED_PARAMS = SCHED_FP_PARAMS + QAT_PARAMS[5:]


def qat_schedule_form(anneal: str = "additive", target: str = "penalty",
                      s_fp_floor: float = S_FP_FLOOR, pin_fp: bool = True) -> Form:
    """[ours] The schedule-aware QAT law: log L = log(L_fp(N, D, D_cool) + delta), L_fp the
    schedule-aware FP part (pinned by the FP runs: FP-only runs and controls; option pin_fp),
    delta the paper's QAT terms. With target="penalty" the fit of the QAT terms reads each
    QAT run's own control (its `control_loss`) for L_fp where it has one, so that delta is
    fitted to measured penalties, not to the FP part's misfit; target="loss" reads the FP
    part everywhere. Predictions (no control) always read the FP part."""
    anneal = _choice_option("qat_schedule", "anneal", anneal, ANNEAL)
    target = _choice_option("qat_schedule", "target", target, SCHED_TARGETS)
    s_fp_floor = _positive_option("qat_schedule", "s_fp_floor", s_fp_floor)
    pin_fp = _bool_option("qat_schedule", "pin_fp", pin_fp)
    log_fp_of = _sched_fp_log_fn(anneal)
    fp_form = sched_fp_form(anneal)

    def log_loss(p, N, D_fp, D_qat, B, M, D_cool, L_ctrl):
        log_fp = log_fp_of(p, N, D_fp + D_qat, D_cool)
        if target == "penalty":
            have = jnp.isfinite(L_ctrl) & (L_ctrl > 0)
            log_fp = jnp.where(have, jnp.log(jnp.where(have, L_ctrl, 1.0)), log_fp)
        delta, ptq = _delta_terms(p, N, D_fp, D_qat, B, M, s_fp_floor)
        out = jax.nn.logsumexp(jnp.stack([log_fp] + delta), axis=0)
        return jnp.where(ptq, jnp.inf, out)

    def check(runs: Runs, where: str):
        _needs_cooldown("qat_schedule")(runs, where)
        _qat_check_runs(runs, where)

    def natural(p):
        out = _sched_natural(p)
        out.update(_qat_natural({k: v for k, v in p.items() if k in QAT_PARAMS}))
        return out

    return Form("qat_schedule", QAT_SCHED_PARAMS, log_loss,
                _qat_grid_for(fp_form, QAT_SCHED_PARAMS), natural,
                f"L_fp(N, D, D_cool) ({anneal} annealing; "
                f"{'pinned by the FP runs' if pin_fp else 'fitted jointly'}) + QAT terms "
                f"fitted to {'penalties against controls' if target == 'penalty' else 'losses'}"
                f", S_fp >= {s_fp_floor:g}", scout_iter=50, polish=32, max_iter=2000,
                options={"anneal": anneal, "target": target, "s_fp_floor": s_fp_floor,
                         "pin_fp": pin_fp},
                variant=qat_schedule_form,
                pinned=_pinner(fp_form) if pin_fp else (lambda runs: {}), check_runs=check)


qat_schedule = register(qat_schedule_form())


# ----------------------------------------------------------------------------- the fitter


def default_cooldown(D_fp, D_qat, B):
    """The tokens of a run's final LR cooldown where none is given: the QAT phase for a fused
    QAT run (the paper's recipe), FP_COOLDOWN of the tokens for a full-precision one."""
    qat = (np.asarray(B) < FP_BITS) & (np.asarray(D_qat) > 0)
    return np.where(qat, D_qat, FP_COOLDOWN * (np.asarray(D_fp) + np.asarray(D_qat)))


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
        with jax.enable_x64(True):
            args = [jnp.asarray(x, jnp.float64) for x in (N, D_fp, D_qat, B)]
            args = jnp.broadcast_arrays(*args)
            M = param_bytes(args[0], args[3]) if M is None else jnp.broadcast_to(
                jnp.asarray(M, jnp.float64), args[0].shape)
            if D_cool is None:
                D_cool = default_cooldown(args[1], args[2], args[3])
            D_cool = jnp.broadcast_to(jnp.asarray(D_cool, jnp.float64), args[0].shape)
            p = {k: jnp.float64(v) for k, v in self.params.items()}
            nan = jnp.full(args[0].shape, jnp.nan)
            return np.asarray(self.form.log_loss(p, *args, M, D_cool, nan))

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
        form = get_form(obj["form"]).with_options(**obj.get("options", {}))
        params = {k: float(obj["params"][k]) for k in form.params}
    except FileNotFoundError:
        raise LawError(f"{path}: no such law file (write one with `qat-jax fit`)") from None
    except LawError as e:
        raise LawError(f"{path}: {e}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise LawError(f"{path}: not a law file written by `qat-jax fit` ({e})") from None
    return Law(form, params, obj.get("fit", {}))


PAD_ROWS = 32  # a table is padded to a multiple of this many rows (weight 0), so that fits
# of one form to tables of similar length share their compiled solver


def _problem(runs: Runs):
    """The table as the solver reads it: its columns and log losses, padded (row 0 repeated)
    to a multiple of PAD_ROWS, and the weights of the real rows (1) and the pads (0)."""
    n = len(runs)
    size = -(-n // PAD_ROWS) * PAD_ROWS
    index = np.concatenate([np.arange(n), np.zeros(size - n, int)])
    cols = [np.asarray(getattr(runs, c), np.float64)[index]
            for c in ("N", "D_fp", "D_qat", "B", BYTES, COOL, CONTROL)]
    log_obs = np.log(np.asarray(runs.loss, np.float64)[index])
    weights = np.concatenate([np.ones(n), np.zeros(size - n)])
    return [jnp.asarray(c) for c in cols], jnp.asarray(log_obs), weights


_SOLVERS: dict = {}


def _solver(form: Form, free: tuple[str, ...], fixed: tuple[str, ...], delta: float,
            max_iter: int, tol: float):
    """L-BFGS (optax, zoom line search) on the Huber objective of `form` from every start at
    once (vmap), jit-compiled once per form, options, free and fixed parameters and settings:
    solve(starts [S, P], weights [S, rows], columns, log_obs, fixed values) -> (x [S, P],
    objective [S])."""
    key = (form.name, json.dumps(form.options, sort_keys=True, default=str), free, fixed,
           float(delta), int(max_iter), float(tol))
    if key in _SOLVERS:
        return _SOLVERS[key]
    opt = optax.lbfgs()

    def objective(x, weights, cols, log_obs, fixed_values):
        p = {**dict(zip(fixed, fixed_values, strict=True)), **dict(zip(free, x, strict=True))}
        r = form.log_loss(p, *cols) - log_obs
        return jnp.sum(weights * optax.losses.huber_loss(r, delta=delta))

    def one(x0, w, cols, log_obs, fixed_values):
        fun = functools.partial(objective, weights=w, cols=cols, log_obs=log_obs,
                                fixed_values=fixed_values)
        value_and_grad = optax.value_and_grad_from_state(fun)

        def body(carry):
            x, state, i = carry
            value, grad = value_and_grad(x, state=state)
            updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fun)
            return optax.apply_updates(x, updates), state, i + 1

        def cond(carry):
            _, state, i = carry
            grad = optax.tree_utils.tree_get(state, "grad")
            return (i == 0) | ((i < max_iter) & (optax.tree.norm(grad) > tol))

        x, _, _ = jax.lax.while_loop(cond, body, (x0, opt.init(x0), 0))
        return x, fun(x)

    _SOLVERS[key] = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None)))
    return _SOLVERS[key]


def _minimise(form: Form, runs: Runs, pinned: dict, delta: float, starts, counts,
              max_iter: int, tol: float):
    """Minimise from every row of `starts` with run weights `counts` [starts, runs]."""
    free = tuple(n for n in form.params if n not in pinned)
    fixed = tuple(pinned)
    cols, log_obs, pad = _problem(runs)
    weights = np.concatenate([np.asarray(counts, np.float64),
                              np.zeros((len(counts), len(pad) - len(runs)))], axis=1)
    solve = _solver(form, free, fixed, delta, max_iter, tol)
    return solve(jnp.asarray(starts, jnp.float64), jnp.asarray(weights), cols, log_obs,
                 jnp.asarray([pinned[k] for k in fixed], jnp.float64))


def fit(runs: Runs, form: str | Form = "qat", *, delta: float = 1e-3,
        max_iter: int | None = None, tol: float = 1e-10, starts: np.ndarray | None = None,
        scout_iter: int | None = None, polish: int | None = None, bootstrap: int = 0,
        seed: int = 0) -> Law:
    """Fit `form` to `runs`: Huber loss (`delta`) on log-loss residuals, summed over runs,
    minimised by batched L-BFGS in float64 from every start of the form's grid: `scout_iter`
    iterations from all of them, then the `polish` best go on to convergence (under vmap every
    start runs as long as the slowest, so polishing thousands would cost minutes); the best
    wins. `scout_iter`, `polish` and `max_iter` default to the form's (Chinchilla: 5, 8, 500
    from its 4,500-point grid; QAT: 50, 32, 2000 from 256 starts, its valley being flat).
    Parameters the form pins (`Form.pinned`: the QAT law's Chinchilla part, fitted to the FP
    runs first) are held fixed; `starts` then gives the others only.
    `law.fit` holds the objective, R^2 and RMSE of the loss (not its log), per-run residuals,
    the pinned parameters, and with `bootstrap` > 0 the 95% intervals of each free parameter
    over that many refits to runs resampled with replacement."""
    form = get_form(form) if isinstance(form, str) else form
    scout_iter = form.scout_iter if scout_iter is None else scout_iter
    polish = form.polish if polish is None else polish
    max_iter = form.max_iter if max_iter is None else max_iter
    runs.check()
    form.check_runs(runs, "runs")
    if len(runs) <= len(form.params):
        raise LawError(f"{len(runs)} runs cannot determine the {len(form.params)} parameters "
                       f"of the {form.name!r} law; give more runs than parameters")
    if not delta > 0:
        raise LawError(f"the Huber delta must be positive (got {delta})")
    pinned = form.pinned(runs)
    free = [n for n in form.params if n not in pinned]
    x0 = np.asarray(form.grid(runs, pinned) if starts is None else starts, np.float64)
    with jax.enable_x64(True):
        xs, values = _minimise(form, runs, pinned, delta, x0, np.ones((len(x0), len(runs))),
                               scout_iter, tol)
        values = np.where(np.isfinite(np.asarray(values)), np.asarray(values), np.inf)
        top = np.argsort(values)[:polish]
        xs, values = _minimise(form, runs, pinned, delta, np.asarray(xs)[top],
                               np.ones((len(top), len(runs))), max_iter, tol)
        values = np.where(np.isfinite(np.asarray(values)), np.asarray(values), np.inf)
        best = int(np.argmin(values))
        if not np.isfinite(values[best]):
            raise LawError(f"the {form.name!r} fit diverged from every start")
        x = np.asarray(xs[best])
        intervals = {}
        if bootstrap > 0:
            intervals = _bootstrap(form, runs, pinned, delta, x, bootstrap, seed, max_iter,
                                   tol)
    values_by_name = {**pinned, **dict(zip(free, x, strict=True))}
    law = Law(form, {n: float(values_by_name[n]) for n in form.params})
    law.fit = {"objective": float(values[best]), "huber_delta": delta, "n_runs": len(runs),
               "n_starts": len(x0), **_fit_quality(law, runs),
               "pinned": {k: float(v) for k, v in pinned.items()},
               "n_pinned_by": int(np.sum(runs.B >= FP_BITS)) if pinned else 0,
               "intervals_95": intervals}
    return law


def bootstrap_intervals(law: Law, runs: Runs, refits: int, seed: int = 0,
                        max_iter: int | None = None, tol: float = 1e-10) -> dict:
    """95% intervals of a fitted law's free parameters (those its fit did not pin) over
    `refits` refits from its own parameters to `runs` resampled with replacement: what
    `fit(bootstrap=...)` gives, for a law fitted already."""
    pinned = law.fit.get("pinned", {})
    free = [n for n in law.form.params if n not in pinned]
    x = np.array([law.params[n] for n in free])
    with jax.enable_x64(True):
        return _bootstrap(law.form, runs, pinned, law.fit.get("huber_delta", 1e-3), x, refits,
                          seed, law.form.max_iter if max_iter is None else max_iter, tol)


def _bootstrap(form: Form, runs: Runs, pinned: dict, delta: float, x, refits: int, seed: int,
               max_iter: int, tol: float) -> dict[str, list[float]]:
    """95% intervals of each free parameter over `refits` refits (from `x`) to the runs
    resampled with replacement (as run weights)."""
    n_runs = len(runs)
    free = [n for n in form.params if n not in pinned]
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n_runs, n_runs), minlength=n_runs)
                       for _ in range(refits)])
    bx, bv = _minimise(form, runs, pinned, delta, np.tile(x, (refits, 1)), counts, max_iter,
                       tol)
    bx = np.asarray(bx)[np.isfinite(np.asarray(bv))]
    return {n: [float(np.percentile(bx[:, i], 2.5)), float(np.percentile(bx[:, i], 97.5))]
            for i, n in enumerate(free)}


def predict(law: Law, runs: Runs) -> np.ndarray:
    """The law's loss for each run of the table, at its own cooldown where the table gives
    one (never its control's loss: a prediction)."""
    cool = np.where(np.isnan(runs.D_cool), default_cooldown(runs.D_fp, runs.D_qat, runs.B),
                    runs.D_cool)
    return law(runs.N, runs.D_fp, runs.D_qat, runs.B, runs.model_bytes, cool)


def _fit_quality(law: Law, runs: Runs) -> dict:
    """R^2 and RMSE of the loss (not its log), and the per-run residuals."""
    resid = predict(law, runs) - runs.loss
    return {"r2": float(1 - np.sum(resid**2) / np.sum((runs.loss - runs.loss.mean()) ** 2)),
            "rmse": float(np.sqrt(np.mean(resid**2))), "residuals": resid.tolist()}
