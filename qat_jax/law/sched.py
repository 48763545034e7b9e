"""[ours] The schedule-aware law forms (METHOD.md section 3b).

With the paper's fused cooldown, the QAT fraction f is also the length of the LR cooldown, and
an FP run's loss depends on that length: the FP part reads effective tokens (the area under
the LR schedule, peak LR = 1: a linear cooldown to ~0 over the last D_cool tokens leaves
D - D_cool / 2) less the annealing gain of the cooldown, which saturates once the cooldown is
long against a window of w tokens: C g(D_cool / w), g(x) = 1 - (1 - e^-x) / x (the momentum-
decayed annealing area of a linear decay, after Tissue et al. 2024, "Scaling Law with Learning
Rate Annealing"). The gain is C itself ("additive") or a share C of the Chinchilla loss
("relative"); with gain="size" it shrinks as a power of the run's tokens and parameters.

The QAT penalty delta is the paper's three terms (penalty="paper") or the two our runs show
(penalty="trained"): a quantization damage that grows with the FP training per byte, as
post-training quantization's does (Kumar et al. 2024, "Scaling Laws for Precision"), and a
cost of starting QAT early, while the FP model is still young.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qat_jax.law.form import (
    D_UNIT,
    FP_BITS,
    LN2,
    N_UNIT,
    QAT_STARTS,
    Form,
    bool_option,
    check_qat_runs,
    choice_option,
    natural_exp,
    needs_cooldown,
    pinner,
    positive_option,
    qat_grid_for,
    register,
)
from qat_jax.law.paper import (
    QAT_PARAMS,
    QAT_START_RANGES,
    S_FP_FLOOR,
    chin_natural,
    chin_terms,
    delta_terms,
    qat_natural,
)
from qat_jax.law.runs import Runs

ANNEAL = ("additive", "relative", "reducible")
# the annealing gain: one C and w; C or w scaled by (D / D_UNIT)^-sigma_d (N / N_UNIT)^-sigma_n
GAINS = ("constant", "size", "window")
PENALTIES = ("paper", "trained")
SCHED_TARGETS = ("penalty", "loss")
SCHED_FP_PARAMS = ("a", "b", "e", "alpha", "beta", "log_c", "log_w")
GAIN_SIZE_PARAMS = ("sigma_d", "sigma_n")
TRAINED_PARAMS = ("log_theta", "kappa", "gamma", "eta", "log_lambda", "mu", "nu", "xi")
FP_START_RANGES = {"log_c": (-4.0, -1.0), "log_w": (9.0, 14.0), "sigma_d": (-0.5, 1.5),
                   "sigma_n": (-0.5, 1.5)}
TRAINED_START_RANGES = {"log_theta": (-8.0, -1.0), "kappa": (0.2, 1.5), "gamma": (0.0, 1.0),
                        "eta": (-0.5, 0.5), "log_lambda": (-3.0, 4.0), "mu": (0.0, 1.0),
                        "nu": (0.0, 2.5), "xi": (0.5, 3.0)}
QAT_START_RANGES.update({k: FP_START_RANGES[k] for k in ("log_c", "log_w")})


def _size_scale(p, N, D):
    return -p["sigma_d"] * jnp.log(D / D_UNIT) - p["sigma_n"] * jnp.log(N / N_UNIT)


def _anneal_gain(p, N, D, D_cool, gain: str):
    log_w = p["log_w"] - (_size_scale(p, N, D) if gain == "window" else 0.0)
    x = D_cool * jnp.exp(-log_w)
    safe = jnp.maximum(x, 1e-3)
    g = jnp.where(x < 1e-3, x / 2 - x * x / 6, 1.0 + jnp.expm1(-safe) / safe)
    log_c = p["log_c"] + (_size_scale(p, N, D) if gain == "size" else 0.0)
    return jnp.exp(log_c) * g


def _sched_fp_log_fn(anneal: str, gain: str):
    def log_fp(p, N, D, D_cool):
        """log L_fp(N, D, D_cool): Chinchilla at D - D_cool / 2 less the annealing gain."""
        terms = chin_terms(p, N, D - 0.5 * D_cool)
        gain_ = _anneal_gain(p, N, D, D_cool, gain)
        if anneal == "reducible":  # E + (A / N^alpha + B / D^beta) e^-gain: never below E
            return jax.nn.logsumexp(jnp.stack([terms[0], terms[1] - gain_, terms[2] - gain_]),
                                    axis=0)
        log_chin = jax.nn.logsumexp(jnp.stack(terms), axis=0)
        if anneal == "relative":
            return log_chin + jnp.log1p(-jnp.minimum(gain_, 1.0 - 1e-9))
        return jnp.log(jnp.maximum(jnp.exp(log_chin) - gain_, 1e-9))

    return log_fp


def _sched_natural(p):
    out = chin_natural(p)
    out.update({"C": natural_exp(p["log_c"]), "w": natural_exp(p["log_w"])})
    out.update({k: p[k] for k in GAIN_SIZE_PARAMS if k in p})
    return out


def _fp_params(gain: str) -> tuple[str, ...]:
    return SCHED_FP_PARAMS + (GAIN_SIZE_PARAMS if gain != "constant" else ())


def _sched_fp_grid(gain: str):
    extras = _fp_params(gain)[5:]

    def grid(runs: Runs, pinned: dict, fit) -> np.ndarray:
        chin = fit(runs, "chinchilla").params  # no schedule term: where its valley lies
        base = np.array([chin[k] for k in ("a", "b", "e", "alpha", "beta")])
        rng = np.random.default_rng(0)
        jitter = rng.normal(0.0, [2.0, 2.0, 0.3, 0.2, 0.2], (QAT_STARTS, 5))
        jitter[0] = 0.0
        extra = np.stack([rng.uniform(*FP_START_RANGES[k], QAT_STARTS) for k in extras], -1)
        return np.concatenate([base + jitter, extra], -1)

    return grid


def sched_fp_form(anneal: str = "additive", gain: str = "constant") -> Form:
    """The full-precision part of the schedule-aware law on its own (fitted to FP runs)."""
    anneal = choice_option("chinchilla_schedule", "anneal", anneal, ANNEAL)
    gain = choice_option("chinchilla_schedule", "gain", gain, GAINS)
    log_fp = _sched_fp_log_fn(anneal, gain)
    scaled = {"constant": "", "size": " (scaled by powers of D and N)",
              "window": " (its window scaled by powers of D and N)"}[gain]
    return Form("chinchilla_schedule", _fp_params(gain),
                lambda p, N, D_fp, D_qat, B, M, D_cool, L_ctrl: log_fp(p, N, D_fp + D_qat,
                                                                      D_cool),
                _sched_fp_grid(gain), _sched_natural,
                f"Chinchilla at D - D_cool / 2, less the cooldown's {anneal} annealing "
                f"gain{scaled}", scout_iter=50, polish=16, max_iter=2000,
                options={"anneal": anneal, "gain": gain},
                variant=sched_fp_form, check_runs=needs_cooldown("chinchilla_schedule"),
                floor=False)


chinchilla_schedule = register(sched_fp_form())


def trained_terms(p, N, D_fp, D_qat, B, M, s_fp_floor: float):
    """[ours] The QAT penalty our runs show, in log form (S_fp = D_fp / M floored at
    `s_fp_floor`, n = N / N_UNIT): theta 2^-kappa B S_fp^gamma / n^eta, the damage of
    quantizing a model trained S_fp tokens per byte (gamma > 0: the more FP training, the
    harder), and lambda 2^-mu B / (n^nu S_fp^xi), the cost of starting QAT while the FP model
    is young (xi > 0); each -inf (no term) for a run without QAT; and the mask of B-bit runs
    without QAT tokens (post-training quantization, which it does not model)."""
    quantized = B < FP_BITS
    qat = quantized & (D_qat > 0)
    log_s_fp = jnp.log(jnp.maximum(D_fp / M, s_fp_floor))
    log_n, off = jnp.log(N / N_UNIT), -jnp.inf
    terms = [
        jnp.where(qat, p["log_theta"] - p["kappa"] * B * LN2 + p["gamma"] * log_s_fp
                  - p["eta"] * log_n, off),
        jnp.where(qat, p["log_lambda"] - p["mu"] * B * LN2 - p["nu"] * log_n
                  - p["xi"] * log_s_fp, off),
    ]
    return terms, quantized & ~qat


def _delta_params(penalty: str) -> tuple[str, ...]:
    return QAT_PARAMS[5:] if penalty == "paper" else TRAINED_PARAMS


def qat_schedule_form(anneal: str = "additive", target: str = "penalty",
                      s_fp_floor: float = S_FP_FLOOR, pin_fp: bool = True,
                      gain: str = "constant", penalty: str = "paper") -> Form:
    """[ours] The schedule-aware QAT law: log L = log(L_fp(N, D, D_cool) + delta), L_fp the
    schedule-aware FP part (pinned by the FP runs: FP-only runs and controls; option pin_fp;
    its annealing gain constant or size-scaled, option gain), delta the paper's QAT terms or
    the trained-damage and early-start terms (option penalty). With target="penalty" the fit
    of delta reads each QAT run's own control (its `control_loss`) for L_fp where it has one,
    so that delta is fitted to measured penalties, not to the FP part's misfit;
    target="loss" reads the FP part everywhere. Predictions (no control) always read the FP
    part."""
    where = "qat_schedule"
    anneal = choice_option(where, "anneal", anneal, ANNEAL)
    target = choice_option(where, "target", target, SCHED_TARGETS)
    gain = choice_option(where, "gain", gain, GAINS)
    penalty = choice_option(where, "penalty", penalty, PENALTIES)
    s_fp_floor = positive_option(where, "s_fp_floor", s_fp_floor)
    pin_fp = bool_option(where, "pin_fp", pin_fp)
    log_fp_of = _sched_fp_log_fn(anneal, gain)
    fp_form = sched_fp_form(anneal, gain)
    terms_of = delta_terms if penalty == "paper" else trained_terms
    params = _fp_params(gain) + _delta_params(penalty)

    def log_loss(p, N, D_fp, D_qat, B, M, D_cool, L_ctrl):
        log_fp = log_fp_of(p, N, D_fp + D_qat, D_cool)
        if target == "penalty":
            have = jnp.isfinite(L_ctrl) & (L_ctrl > 0)
            log_fp = jnp.where(have, jnp.log(jnp.where(have, L_ctrl, 1.0)), log_fp)
        delta, ptq = terms_of(p, N, D_fp, D_qat, B, M, s_fp_floor)
        out = jax.nn.logsumexp(jnp.stack([log_fp] + delta), axis=0)
        return jnp.where(ptq, jnp.inf, out)

    def check(runs: Runs, where: str):
        needs_cooldown("qat_schedule")(runs, where)
        check_qat_runs(runs, where)

    def natural(p):
        out = _sched_natural(p)
        out.update(qat_natural({k: v for k, v in p.items()
                                if k not in ("log_c", "log_w") + GAIN_SIZE_PARAMS}))
        return out

    ranges = {**QAT_START_RANGES, **(TRAINED_START_RANGES if penalty == "trained" else {}),
              **FP_START_RANGES}
    scaled = {"constant": "", "size": ", size-scaled gain", "window": ", size-scaled window"}[gain]
    return Form("qat_schedule", params, log_loss, qat_grid_for(fp_form, params, ranges),
                natural,
                f"L_fp(N, D, D_cool) ({anneal} annealing{scaled}; "
                f"{'pinned by the FP runs' if pin_fp else 'fitted jointly'}) + "
                f"{'the paper' if penalty == 'paper' else 'trained-damage and early-start'}"
                f"'s QAT terms fitted to "
                f"{'penalties against controls' if target == 'penalty' else 'losses'}"
                f", S_fp >= {s_fp_floor:g}", scout_iter=50, polish=32, max_iter=2000,
                options={"anneal": anneal, "target": target, "s_fp_floor": s_fp_floor,
                         "pin_fp": pin_fp, "gain": gain, "penalty": penalty},
                variant=qat_schedule_form, floor=False,
                pinned=pinner(fp_form) if pin_fp else (lambda runs, fit: {}), check_runs=check)


qat_schedule = register(qat_schedule_form())
QAT_SCHED_PARAMS = qat_schedule.params
