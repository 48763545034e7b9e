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
from qat_jax.runs import BYTES, COLUMNS, LawError, Runs, param_bytes, read_runs  # noqa: F401

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
    """A loss law: `log_loss(p, N, D_fp, D_qat, B, M)` (M the model's bytes) with p a dict of
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
    lambda p, N, D_fp, D_qat, B, M: jax.nn.logsumexp(
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


def _qat_log_loss_fn(chinchilla_tokens: str, s_fp_floor: float):
    def log_loss(p, N, D_fp, D_qat, B, M):
        """The paper's law (docs/METHOD.md section 3), log L = log(L_chin(N, D) + delta), with
        S_qat = D_qat / M and S_fp = D_fp / M (M the model's bytes):
        theta 2^-kappa B + phi 2^-chi B / (N^psi S_qat^omega)
        + lambda 2^-mu B / (N^nu S_fp^xi S_qat^rho). delta is 0 for a full-precision run
        (B >= 16); a B-bit model with no QAT tokens (S_qat = 0) has an infinite loss under
        this form. [ours] S_fp is floored at `s_fp_floor`, so QAT from scratch (S_fp = 0)
        stays finite and the law stays continuous as f -> 1; with chinchilla_tokens="fp",
        Chinchilla's D = D_fp is floored at the same S."""
        quantized = B < FP_BITS
        qat = quantized & (D_qat > 0)
        log_bytes = jnp.log(M)
        log_s_qat = jnp.log(jnp.where(qat, D_qat, 1.0)) - log_bytes  # safe log: where-masked
        log_s_fp = jnp.log(jnp.maximum(D_fp / M, s_fp_floor))
        D = (D_fp + D_qat if chinchilla_tokens == "total"
             else jnp.maximum(D_fp, s_fp_floor * M))
        log_n, off = jnp.log(N), -jnp.inf
        terms = _chin_terms(p, N, D) + [
            jnp.where(qat, p["log_theta"] - p["kappa"] * B * LN2, off),
            jnp.where(qat, p["log_phi"] - p["chi"] * B * LN2 - p["psi"] * log_n
                      - p["omega"] * log_s_qat, off),
            jnp.where(qat, p["log_lambda"] - p["mu"] * B * LN2 - p["nu"] * log_n
                      - p["xi"] * log_s_fp - p["rho"] * log_s_qat, off),
        ]
        log_loss = jax.nn.logsumexp(jnp.stack(terms), axis=0)
        return jnp.where(quantized & ~qat, jnp.inf, log_loss)

    return log_loss


def _fp_runs(runs: Runs) -> Runs:
    return runs.take(runs.B >= FP_BITS)


def _pin_fp(runs: Runs) -> dict[str, float]:
    """The paper's FP loss regularisation: the Chinchilla part (E, A, alpha, B, beta) is
    fitted to the full-precision runs alone and then held fixed, so the QAT terms explain only
    what quantization adds."""
    fp = _fp_runs(runs)
    if len(fp) <= len(chinchilla.params):
        raise LawError(f"pinning the Chinchilla part to the full-precision runs needs more than "
                       f"{len(chinchilla.params)} of them (rows with B >= {FP_BITS:g}); this "
                       f"table has {len(fp)}. Add FP runs, or fit unpinned (law option "
                       f"pin_fp=false)")
    return fit(fp, "chinchilla").params


def _qat_grid(runs: Runs, pinned: dict) -> np.ndarray:
    """Start points of the unpinned parameters: the QAT terms at QAT_STARTS seeded random
    points of QAT_START_RANGES; unpinned, the Chinchilla part starts from a fit of the
    Chinchilla form (to the FP runs when there are enough, else to all runs)."""
    base = pinned
    if not pinned:
        fp = _fp_runs(runs)
        base = fit(fp if len(fp) >= 2 * len(chinchilla.params) else runs, "chinchilla").params
    rng = np.random.default_rng(0)
    names = [n for n in QAT_PARAMS if n not in pinned]
    starts = np.empty((QAT_STARTS, len(names)))
    for i, name in enumerate(names):
        if name in base:
            starts[:, i] = base[name]
        else:
            lo, hi = QAT_START_RANGES[name]
            starts[:, i] = rng.uniform(lo, hi, QAT_STARTS)
    return starts


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


def qat_form(chinchilla_tokens: str = "total", s_fp_floor: float = S_FP_FLOOR,
             pin_fp: bool = True) -> Form:
    """The paper's QAT law with our choices as options: which tokens the Chinchilla part
    counts ("total" = D_fp + D_qat, or "fp" = D_fp), the floor of S_fp (> 0), and whether the
    full-precision runs pin the Chinchilla part (the paper's FP loss regularisation; False fits
    all 16 parameters jointly)."""
    if chinchilla_tokens not in CHINCHILLA_TOKENS:
        raise LawError(f"qat law: chinchilla_tokens must be one of {CHINCHILLA_TOKENS} "
                       f"(got {chinchilla_tokens!r})")
    try:
        s_fp_floor = float(s_fp_floor)
    except (TypeError, ValueError):
        s_fp_floor = math.nan
    if not (s_fp_floor > 0 and math.isfinite(s_fp_floor)):
        raise LawError(f"qat law: s_fp_floor must be a positive number (got {s_fp_floor!r})")
    if isinstance(pin_fp, str) and pin_fp.lower() in ("true", "false"):
        pin_fp = pin_fp.lower() == "true"
    if not isinstance(pin_fp, bool):
        raise LawError(f"qat law: pin_fp must be true or false (got {pin_fp!r})")
    d = "D_fp + D_qat" if chinchilla_tokens == "total" else "D_fp"
    pinned = "pinned by the FP runs" if pin_fp else "fitted jointly"
    return Form("qat", QAT_PARAMS, _qat_log_loss_fn(chinchilla_tokens, s_fp_floor), _qat_grid,
                _qat_natural, f"L_chin(N, {d}) ({pinned}) + QAT terms (METHOD.md section 3), "
                f"S_fp >= {s_fp_floor:g}", scout_iter=50, polish=32, max_iter=2000,
                options={"chinchilla_tokens": chinchilla_tokens, "s_fp_floor": s_fp_floor,
                         "pin_fp": pin_fp},
                variant=qat_form, pinned=_pin_fp if pin_fp else (lambda runs: {}),
                check_runs=_qat_check_runs)


qat = register(qat_form())


# ----------------------------------------------------------------------------- the fitter


@dataclasses.dataclass
class Law:
    """A fitted law: its form and parameters, callable as law(N, D_fp, D_qat, B[, M]) -> loss
    (M, the model's bytes, defaults to N B / 8)."""

    form: Form
    params: dict[str, float]
    fit: dict = dataclasses.field(default_factory=dict)  # objective, r2, rmse, ...

    def log_loss(self, N, D_fp, D_qat, B, M=None):
        with jax.enable_x64(True):
            args = [jnp.asarray(x, jnp.float64) for x in (N, D_fp, D_qat, B)]
            args = jnp.broadcast_arrays(*args)
            M = param_bytes(args[0], args[3]) if M is None else jnp.broadcast_to(
                jnp.asarray(M, jnp.float64), args[0].shape)
            p = {k: jnp.float64(v) for k, v in self.params.items()}
            return np.asarray(self.form.log_loss(p, *args, M))

    def __call__(self, N, D_fp, D_qat, B, M=None):
        return np.exp(self.log_loss(N, D_fp, D_qat, B, M))

    def natural(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.form.natural(self.params).items()}

    def save(self, path: str | Path):
        files.atomic_write(path, json.dumps(
            {"form": self.form.name, "options": self.form.options, "params": self.params,
             "natural": self.natural(), "fit": self.fit}, indent=2) + "\n")


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


def _objective(form: Form, runs: Runs, delta: float, pinned: dict):
    names = [n for n in form.params if n not in pinned]
    data = [jnp.asarray(getattr(runs, c)) for c in (*COLUMNS, BYTES)]
    log_obs = jnp.log(data[4])
    fixed = {k: jnp.float64(v) for k, v in pinned.items()}

    def objective(x, weights):
        p = {**fixed, **dict(zip(names, x, strict=True))}
        r = form.log_loss(p, *data[:4], data[5]) - log_obs
        return jnp.sum(weights * optax.losses.huber_loss(r, delta=delta))

    return objective


def _minimise(objective, starts, weights, max_iter: int, tol: float):
    """L-BFGS (optax, zoom line search) from every start at once (vmap), jit-compiled.
    Returns (x [starts, P], objective [starts])."""
    opt = optax.lbfgs()

    def one(x0, w):
        fun = functools.partial(objective, weights=w)
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

    return jax.jit(jax.vmap(one))(starts, weights)


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
        objective = _objective(form, runs, delta, pinned)
        xs, values = _minimise(objective, jnp.asarray(x0), jnp.ones((len(x0), len(runs))),
                               scout_iter, tol)
        values = np.where(np.isfinite(np.asarray(values)), np.asarray(values), np.inf)
        top = np.argsort(values)[:polish]
        xs, values = _minimise(objective, xs[top], jnp.ones((len(top), len(runs))), max_iter,
                               tol)
        values = np.where(np.isfinite(np.asarray(values)), np.asarray(values), np.inf)
        best = int(np.argmin(values))
        if not np.isfinite(values[best]):
            raise LawError(f"the {form.name!r} fit diverged from every start")
        x = np.asarray(xs[best])
        intervals = {}
        if bootstrap > 0:
            intervals = _bootstrap(objective, x, free, len(runs), bootstrap, seed, max_iter, tol)
    values_by_name = {**pinned, **dict(zip(free, x, strict=True))}
    law = Law(form, {n: float(values_by_name[n]) for n in form.params})
    law.fit = {"objective": float(values[best]), "huber_delta": delta, "n_runs": len(runs),
               "n_starts": len(x0), **_fit_quality(law, runs),
               "pinned": {k: float(v) for k, v in pinned.items()},
               "n_pinned_by": int(np.sum(runs.B >= FP_BITS)) if pinned else 0,
               "intervals_95": intervals}
    return law


def _bootstrap(objective, x, free: list[str], n_runs: int, refits: int, seed: int,
               max_iter: int, tol: float) -> dict[str, list[float]]:
    """95% intervals of each free parameter over `refits` refits (from `x`) to the runs
    resampled with replacement (as run weights)."""
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n_runs, n_runs), minlength=n_runs)
                       for _ in range(refits)])
    bx, bv = _minimise(objective, jnp.tile(x, (refits, 1)), jnp.asarray(counts, jnp.float64),
                       max_iter, tol)
    bx = np.asarray(bx)[np.isfinite(np.asarray(bv))]
    return {n: [float(np.percentile(bx[:, i], 2.5)), float(np.percentile(bx[:, i], 97.5))]
            for i, n in enumerate(free)}


def _fit_quality(law: Law, runs: Runs) -> dict:
    """R^2 and RMSE of the loss (not its log), and the per-run residuals."""
    resid = law(runs.N, runs.D_fp, runs.D_qat, runs.B, runs.model_bytes) - runs.loss
    return {"r2": float(1 - np.sum(resid**2) / np.sum((runs.loss - runs.loss.mean()) ** 2)),
            "rmse": float(np.sqrt(np.mean(resid**2))), "residuals": resid.tolist()}
