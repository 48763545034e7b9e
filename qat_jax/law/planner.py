"""The planner: the questions the paper answers with a fitted loss law (METHOD.md section 3).

- `optimal_fraction`: the QAT fraction f in [0, 1] with the least predicted loss for a model
  of N parameters, D total tokens and B bits;
- `best_bits_under_memory`: under a memory budget of M bytes, the largest N whose B-bit model
  fits (N = 8 M / B, or a model shape's own bytes: `ShapeBytes`) for each bit width, with its
  optimal fraction: which (B, N) predicts the least loss;
- `fp_equivalent`: the full-precision model size, or token count, whose loss a B-bit QAT model
  matches;
- `wasted_tokens`: [ours] the extra total tokens a split f needs to reach the optimal split's
  loss at the same N and B;
- `doubts` and `extrapolation`: [ours] whether a law's plan means anything where it is asked
  (an optimum at an end of [0, 1], a loss below the law's own floor or above every loss it was
  fitted to), and how far outside its runs' N and D that is.

A law is any `law.Law` (or a callable of (N, D_fp, D_qat, B, M) -> loss on numpy arrays). M is
the model's bytes, the denominator of S; None (the default everywhere) is the paper's N B / 8.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import numpy as np
from scipy import optimize

from qat_jax.law.form import FP_BITS
from qat_jax.law.runs import param_bytes


def predicted_loss(law, N, D_fp, D_qat, B, M=None, D_cool=None) -> float:
    """The law's loss of one run; D_cool, the tokens of its final LR cooldown, for a law that
    models the schedule (None: the law's default, the fused recipe)."""
    M = param_bytes(N, B) if M is None else M
    args = [np.float64(x) for x in (N, D_fp, D_qat, B, M)]
    if D_cool is not None:
        return float(np.asarray(law(*args, np.float64(D_cool))))
    return float(np.asarray(law(*args)))


def split_loss(law, N, D, B, f, M=None) -> np.ndarray:
    """The law's loss with a share f of the D total tokens in QAT (f and D broadcast)."""
    f, D = np.broadcast_arrays(np.asarray(f, np.float64), np.asarray(D, np.float64))
    M = param_bytes(N, B) if M is None else M
    return np.asarray(law(np.full_like(f, N), (1.0 - f) * D, f * D, np.full_like(f, B),
                          np.full_like(f, M)))


def optimal_fraction(law, N: float, D: float, B: float, M: float | None = None,
                     grid: int = 1001) -> tuple[float, float]:
    """(f*, predicted loss at f*): a dense grid over [0, 1], then Brent's bounded search
    (scipy.optimize.minimize_scalar) between the best grid point's neighbours. A
    full-precision B has no QAT: (0, its loss)."""
    if B >= FP_BITS:
        return 0.0, predicted_loss(law, N, D, 0.0, B, M)
    split = functools.partial(split_loss, law, N, D, B, M=M)
    fs = np.linspace(0.0, 1.0, grid)
    losses = split(fs)
    i = int(np.nanargmin(losses))
    lo, hi = fs[max(i - 1, 0)], fs[min(i + 1, grid - 1)]
    found = optimize.minimize_scalar(lambda f: split([f])[0], bounds=(lo, hi), method="bounded",
                                     options={"xatol": 1e-18, "maxiter": 2000})
    f, best = float(found.x), float(found.fun)
    if losses[i] < best:  # the grid's endpoint (f = 0 or 1) can beat the interior
        return float(fs[i]), float(losses[i])
    return f, best


INTERIOR = (0.005, 0.995)  # a law's optimum strictly inside [0, 1]


def doubts(law, N: float, D: float, B: float, f: float, loss: float) -> list[str]:
    """Why the law's plan (f*, its predicted loss) for N parameters, D tokens and B bits means
    nothing ([] when none): its optimum at an end of [0, 1] (the QAT terms do not balance
    there: the paper's and our laws put it inside), a loss that is not finite, below the law's
    irreducible loss E (in a form where E is a floor: `Form.floor`), or above every loss it
    was fitted to (law.fit's domain; a law file written before it was recorded is not measured
    against it)."""
    out = []
    lo, hi = INTERIOR
    if B < FP_BITS and not lo < f < hi:
        out.append(f"its optimum is at an end of [0, 1] (f* = {f:.3f})")
    floor = law.natural().get("E") if getattr(getattr(law, "form", None), "floor",
                                              False) else None
    top = getattr(law, "fit", {}).get("domain", {}).get("loss", [None, None])[1]
    if not math.isfinite(loss):
        out.append(f"its predicted loss is {loss}")
    elif floor is not None and not loss > floor:
        out.append(f"its predicted loss {loss:.4g} is below its own irreducible loss "
                   f"E = {floor:.4g}")
    elif top is not None and loss > top:
        out.append(f"its predicted loss {loss:.4g} is above every loss it was fitted to "
                   f"(at most {top:.4g})")
    return out


def extrapolation(law, N: float, D: float) -> str | None:
    """How far N and D lie outside the runs the law was fitted to (law.fit's domain), as
    text; None inside them, or for a law file without the domain."""
    domain = getattr(law, "fit", {}).get("domain")
    if not domain:
        return None
    parts = []
    for name, x, what in (("N", N, "model"), ("D", D, "budget")):
        lo, hi = domain[name]
        if x > hi:
            parts.append(f"{name} = {x:.3g} is {_ratio(x / hi)}x the largest {what} it was "
                         f"fitted to ({hi:.3g})")
        elif x < lo:
            parts.append(f"{name} = {x:.3g} is 1/{_ratio(lo / x)} of the smallest {what} it "
                         f"was fitted to ({lo:.3g})")
    return "; ".join(parts) or None


def _ratio(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _solve_decreasing(fn, target: float, lo: float, hi: float, points: int = 400):
    """x in [lo, hi] (log-spaced search) where the decreasing fn(x) first reaches `target`;
    None when it does not within the range. The crossing is bracketed on the grid, then
    found by Brent's method (scipy.optimize.brentq) in log x."""
    xs = np.geomspace(lo, hi, points)
    ys = fn(xs)
    reached = np.flatnonzero(ys <= target)
    if not reached.size:
        return None
    j = int(reached[0])
    if j == 0:
        return float(xs[0])
    gap = lambda u: float(fn(np.array([math.exp(u)]))[0]) - target
    return math.exp(optimize.brentq(gap, math.log(xs[j - 1]), math.log(xs[j]), xtol=1e-14))


def wasted_tokens(law, N: float, D: float, B: float, f: float, M: float | None = None,
                  max_factor: float = 1e3) -> dict:
    """What the split f costs against the optimal split: the total tokens D' >= D at which
    the split f reaches the loss the optimal split has at D. `extra_tokens` = D' - D (None if
    not reached within max_factor x D)."""
    f_opt, target = optimal_fraction(law, N, D, B, M)
    d_needed = _solve_decreasing(lambda d: split_loss(law, N, d, B, f, M), target, D,
                                 D * max_factor)
    extra = None if d_needed is None else max(d_needed - D, 0.0)
    return {"fraction": f, "optimal_fraction": f_opt, "loss": predicted_loss(
        law, N, (1 - f) * D, f * D, B, M), "optimal_loss": target, "tokens_needed": d_needed,
        "extra_tokens": extra, "extra_frac": None if extra is None else extra / D}


def tokens_for_gain(law, N: float, D: float, B: float, f: float, gain: float,
                    M: float | None = None, max_factor: float = 1e3) -> float | None:
    """The total tokens D' >= D at which the split f's predicted loss is `gain` nats below its
    loss at D (None when not reached within max_factor x D); D for gain <= 0."""
    if gain <= 0:
        return float(D)
    target = predicted_loss(law, N, (1 - f) * D, f * D, B, M) - gain
    return _solve_decreasing(lambda d: split_loss(law, N, d, B, f, M), target, D,
                             D * max_factor)


def fp_equivalent(law, N: float, D: float, B: float, f: float | None = None,
                  M: float | None = None) -> dict:
    """The full-precision model that a B-bit QAT model (split f, default optimal) matches:
    `N_fp`, the parameters that reach its loss with the same D tokens, and `D_fp_tokens`,
    the tokens the same N needs in full precision. None where full precision never gets that
    high (the QAT model is better than any in the searched range)."""
    if f is None:
        f, loss = optimal_fraction(law, N, D, B, M)
    else:
        loss = predicted_loss(law, N, (1 - f) * D, f * D, B, M)
    # A B-bit model is worse than the FP one of the same N and D; the FP model reaching the
    # same loss is smaller (or trained on fewer tokens): search downwards.
    n_fp = _solve_decreasing(
        lambda n: -np.asarray(law(n, np.full_like(n, D), 0 * n, np.full_like(n, FP_BITS),
                                  param_bytes(n, FP_BITS))),
        -loss, N, N * 1e-4)
    d_fp = _solve_decreasing(
        lambda d: -np.asarray(law(np.full_like(d, N), d, 0 * d, np.full_like(d, FP_BITS),
                                  np.full_like(d, param_bytes(N, FP_BITS)))),
        -loss, D, D * 1e-4)
    return {"fraction": f, "loss": loss, "N_fp": n_fp, "D_fp_tokens": d_fp,
            "N_ratio": None if n_fp is None else n_fp / N}


class ShapeBytes:
    """The bytes of a model of N parameters at B bits when it has the shape of the model `m`
    with scales as `q` (a sizes.ModelSpec and quant.QuantConfig: the same share of embedding,
    norms and scales; sizes.served_bytes): N B / 8 times that model's own ratio of served bytes
    to N B / 8 at that B. The planner's `--config`."""

    def __init__(self, m, q):
        from qat_jax import sizes
        self.params = sizes.param_count(m, q)["total"]
        self._served = functools.partial(sizes.served_bytes, m, q)

    def ratio(self, B: float) -> float:
        return self._served(None if B >= FP_BITS else B)["total"] / param_bytes(self.params, B)

    def __call__(self, N, B):
        return param_bytes(N, B) * self.ratio(B)


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10,
          "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> float:
    """A memory budget as people write it: '8GB' (SI), '512MiB' (binary), '1e9' (bytes)."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", text)
    try:
        value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    except (AttributeError, KeyError, ValueError):
        raise ValueError("give a size such as 8GB, 512MiB or 1e9") from None
    if not value > 0:
        raise ValueError(f"a memory budget must be positive (got {value:g} bytes)")
    return value


def best_bits_under_memory(law, memory_bytes: float, D: float,
                           bits=(1.0, 1.58, 2.0, 3.0, 4.0, 6.0, 8.0, FP_BITS),
                           ratio: Callable[[float], float] | None = None) -> list[dict]:
    """For each bit width, the largest model that fits `memory_bytes`: N = 8 M / B, or, with
    `ratio(B)` the model's bytes over N B / 8 (`ShapeBytes(m, q).ratio`), N = 8 M / (B ratio);
    its optimal QAT fraction and predicted loss; best (least loss) first."""
    rows = []
    for B in bits:
        ratio_B = 1.0 if ratio is None else ratio(B)
        N = 8.0 * memory_bytes / (B * ratio_B)
        f, loss = optimal_fraction(law, N, D, B, param_bytes(N, B) * ratio_B)
        rows.append({"B": B, "N": N, "fraction": f, "loss": loss, "bytes_ratio": ratio_B})
    return sorted(rows, key=lambda r: r["loss"])
