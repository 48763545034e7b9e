"""The law fitter (METHOD.md section 3): `fit` fits a registered form (law/form.py) to a runs
table by batched L-BFGS in float64 from a grid of starts, finished by damped Newton steps; with
bootstrap refits for 95% intervals. The package qat_jax.law is the one name the rest of the
package reads the laws by.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qat_jax.law.form import FP_BITS, Form, Law, get_form, predict
from qat_jax.law.runs import BYTES, CONTROL, COOL, LawError, Runs

PAD_ROWS = 128  # a table is padded to a multiple of this many rows (weight 0), so that fits
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
            max_iter: int, tol: float, batched: bool):
    """L-BFGS (optax, zoom line search) on the Huber objective of `form` from every start,
    jit-compiled once per form, options, free and fixed parameters and settings:
    solve(starts [S, P], weights [S, rows], columns, log_obs, fixed values) -> (x [S, P],
    objective [S]). `batched`: all starts at once (vmap), for a few iterations each (a scout:
    under vmap every start runs as long as the slowest); else one after another (lax.map),
    each to its own convergence (a polish: 2-3x faster than vmap, whose lanes all run to the
    slowest start's iteration count)."""
    key = (*form.key, free, fixed, float(delta), int(max_iter), float(tol), batched)
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

    if batched:
        _SOLVERS[key] = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None)))
    else:
        _SOLVERS[key] = jax.jit(lambda starts, weights, cols, log_obs, fixed_values: jax.lax.map(
            lambda sw: one(*sw, cols, log_obs, fixed_values), (starts, weights)))
    return _SOLVERS[key]


_NEWTON: dict = {}


def _newton_polish(form: Form, runs: Runs, pinned: dict, delta: float, x, value: float,
                   steps: int = 30):
    """The best L-BFGS solution finished by damped Newton steps (Levenberg-Marquardt on the
    exact Hessian of the Huber objective): L-BFGS stops at its iteration limit in a flat
    valley, at a point that depends on the last bits of its arithmetic; Newton's steps reach
    the minimum itself, so the fitted law is the same wherever the fit runs. A step is kept
    only if it lowers the objective; (x, objective)."""
    free = tuple(n for n in form.params if n not in pinned)
    fixed = tuple(pinned)
    cols, log_obs, pad = _problem(runs)
    key = (*form.key, free, fixed, float(delta), len(pad))
    if key not in _NEWTON:
        def objective(v, weights, cols, log_obs, fixed_values):
            p = {**dict(zip(fixed, fixed_values, strict=True)),
                 **dict(zip(free, v, strict=True))}
            r = form.log_loss(p, *cols) - log_obs
            return jnp.sum(weights * optax.losses.huber_loss(r, delta=delta))

        _NEWTON[key] = (jax.jit(objective), jax.jit(jax.grad(objective)),
                        jax.jit(jax.hessian(objective)))
    fun, grad, hess = _NEWTON[key]
    args = (jnp.asarray(pad), cols, log_obs,
            jnp.asarray([pinned[k] for k in fixed], jnp.float64))
    x = np.asarray(x, np.float64)
    damping = 1e-6
    for _ in range(steps):
        g = np.asarray(grad(jnp.asarray(x), *args))
        h = np.asarray(hess(jnp.asarray(x), *args))
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(h))):
            break
        scale = np.maximum(np.abs(np.diag(h)), 1e-12)
        while damping < 1e6:
            try:
                step = np.linalg.solve(h + damping * np.diag(scale), g)
            except np.linalg.LinAlgError:
                damping *= 10
                continue
            trial = x - step
            new = float(fun(jnp.asarray(trial), *args))
            if np.isfinite(new) and new <= value:
                x, value, damping = trial, new, max(damping / 10, 1e-12)
                break
            damping *= 10
        else:
            break
        if np.max(np.abs(step)) < 1e-12:
            break
    return x, value


def _minimise(form: Form, runs: Runs, pinned: dict, delta: float, starts, counts,
              max_iter: int, tol: float, batched: bool = False):
    """Minimise from every row of `starts` with run weights `counts` [starts, runs] (`batched`:
    see `_solver`)."""
    free = tuple(n for n in form.params if n not in pinned)
    fixed = tuple(pinned)
    cols, log_obs, pad = _problem(runs)
    weights = np.concatenate([np.asarray(counts, np.float64),
                              np.zeros((len(counts), len(pad) - len(runs)))], axis=1)
    solve = _solver(form, free, fixed, delta, max_iter, tol, batched and len(starts) > 1)
    return solve(jnp.asarray(starts, jnp.float64), jnp.asarray(weights), cols, log_obs,
                 jnp.asarray([pinned[k] for k in fixed], jnp.float64))


def fit(runs: Runs, form: str | Form = "qat", *, delta: float = 1e-3,
        max_iter: int | None = None, tol: float = 1e-10, starts: np.ndarray | None = None,
        scout_iter: int | None = None, polish: int | None = None, bootstrap: int = 0,
        seed: int = 0, newton: int = 30) -> Law:
    """Fit `form` to `runs`: Huber loss (`delta`) on log-loss residuals, summed over runs,
    minimised by batched L-BFGS in float64 from every start of the form's grid: `scout_iter`
    iterations from all of them, then the `polish` best go on to convergence (under vmap every
    start runs as long as the slowest, so polishing thousands would cost minutes); the best
    wins, finished by up to `newton` damped Newton steps (`_newton_polish`; 0: none). `scout_iter`,
    `polish` and `max_iter` default to the form's (Chinchilla: 5, 8, 500
    from its 4,500-point grid; QAT: 50, 32, 2000 from 256 starts, its valley being flat).
    Parameters the form pins (`Form.pinned`: the QAT law's Chinchilla part, fitted to the FP
    runs first) are held fixed; `starts` then gives the others only.
    `law.fit` holds the objective, R^2 and RMSE of the loss (not its log), per-run residuals,
    the pinned parameters, the runs' domain (`_domain`), and with `bootstrap` > 0 the 95%
    intervals of each free parameter over that many refits to runs resampled with
    replacement."""
    form = get_form(form) if isinstance(form, str) else form
    scout_iter = form.scout_iter if scout_iter is None else scout_iter
    polish = form.polish if polish is None else polish
    max_iter = form.max_iter if max_iter is None else max_iter
    runs.check()
    form.check_runs(runs, "runs")
    if len(runs) <= len(form.params):
        raise LawError(f"{len(runs)} runs cannot determine the {len(form.params)} parameters "
                       f"of the {form.name!r} law; give more runs than parameters")
    if np.ptp(runs.loss) == 0:
        raise LawError(f"all {len(runs)} losses are equal ({runs.loss[0]:g}): a law fitted "
                       f"to them explains nothing (its R^2 is undefined); give runs that differ")
    if not delta > 0:
        raise LawError(f"the Huber delta must be positive (got {delta})")
    pinned = form.pinned(runs, fit)
    free = [n for n in form.params if n not in pinned]
    x0 = np.asarray(form.grid(runs, pinned, fit) if starts is None else starts, np.float64)
    with jax.enable_x64(True):
        xs, values = _minimise(form, runs, pinned, delta, x0, np.ones((len(x0), len(runs))),
                               scout_iter, tol, batched=True)
        values = np.where(np.isfinite(np.asarray(values)), np.asarray(values), np.inf)
        top = np.argsort(values)[:polish]
        xs, values = _minimise(form, runs, pinned, delta, np.asarray(xs)[top],
                               np.ones((len(top), len(runs))), max_iter, tol)
        values = np.where(np.isfinite(np.asarray(values)), np.asarray(values), np.inf)
        best = int(np.argmin(values))
        if not np.isfinite(values[best]):
            raise LawError(f"the {form.name!r} fit diverged from every start")
        x, values[best] = _newton_polish(form, runs, pinned, delta, np.asarray(xs[best]),
                                         float(values[best]), newton)
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
               "intervals_95": intervals, "domain": _domain(runs)}
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


def _domain(runs: Runs) -> dict[str, list[float]]:
    """The range of the runs a law is fitted to: [least, most] of N, of the total tokens D and
    of the loss (what `planner.doubts` measures a plan against)."""
    return {k: [float(np.min(v)), float(np.max(v))]
            for k, v in (("N", runs.N), ("D", runs.D_fp + runs.D_qat), ("loss", runs.loss))}


def _fit_quality(law: Law, runs: Runs) -> dict:
    """R^2 and RMSE of the loss (not its log), and the per-run residuals."""
    resid = predict(law, runs) - runs.loss
    return {"r2": float(1 - np.sum(resid**2) / np.sum((runs.loss - runs.loss.mean()) ** 2)),
            "rmse": float(np.sqrt(np.mean(resid**2))), "residuals": resid.tolist()}
