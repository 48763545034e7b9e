"""[ours] The WSD law `qat_wsd` (METHOD.md section 3c): the loss of a run trained with a warmup-
stable-decay learning rate, full precision or with QAT in its last share f of the tokens.

    L = L_fp(N, D, D_cool) + P(N, D, f, B)

The full-precision part reads the LR schedule the way the multi-power law of Luo et al. (2025,
"A Multi-Power Law for Loss Curve Prediction Across Learning Rate Schedules") does: a power law
in the area under the LR (peak LR = 1; a linear cooldown to ~0 over the last D_cool tokens
leaves S1 = D - D_cool / 2), less an annealing gain that a cooldown realises only as far as LR
area follows each of its LR drops. With Chinchilla's size term (one exponent for N and S1):

    L_fp = L_c - G_eff h(D_cool)          L_c = E + A / n^beta + B / s1^beta
    G_eff = L_c (1 - exp(-G / L_c)),  G = g d^sigma      (the gain; capped by L_c)
    h(D_cool) = int_0^1 1 - exp(-D_cool v^(2 - zeta) / (2 w_eff)) dv,   w_eff = w (d / n)^-upsilon

n = N / 1e5, d = D / 1e6 and s1 = S1 / 1e6 (units that keep the logs of the coefficients near
0). h is the share of the full gain a linear cooldown realises: the LR drop at level v (of the
peak) is followed by LR area D_cool v^2 / 2, and realises 1 - exp(-area v^-zeta / w_eff) of its
gain (the multi-power law's G(x) = 1 - (1 + C x)^-b in its b -> infinity limit). A short
cooldown realises little of the gain; a long one gives up LR area (S1 falls). Option
anneal_tpp=true lets the LR area a drop needs (w_eff) fall with the tokens per parameter the
model has seen (upsilon > 0: a model trained further anneals in fewer tokens); the default
holds w fixed (upsilon = 0: the law's first version, which law files written before the option
meant). Option saturation=power realises each drop's gain as the multi-power law's own
G(x) = 1 - (1 + x)^-b (b finite, a parameter in place of sigma) and holds the gain g constant:
a cooldown keeps gaining over decades of its length, so the gain need not grow with D (the
variant the committed study chooses by held-out error; the default `exp` is the law's first
version, which law files written before the option meant).

The QAT penalty P (quantized runs with QAT tokens; 0 for full precision), f = D_qat / D:

    P = theta 2^(-kappa B) d^gamma / n^eta f^-omega                    damage, unrecovered
      + lambda 2^(-mu B) / (n^nu d^xi) exp(-(1 - f) / tau)             starting QAT early

The first term is the damage of quantizing a trained model, which grows with the tokens it has
seen (gamma > 0, as post-training quantization's degradation does in Kumar et al. 2024,
"Scaling Laws for Precision"), as far as QAT has not recovered it: the more, the smaller the
share of the budget given to QAT (f^-omega, omega > 0; f^-omega >= 1, so theta 2^(-kappa B)
d^gamma / n^eta is what even a QAT-only run keeps). A separate floor, theta (1 + phi f^-omega),
fitted no better on our runs and left theta, phi and omega a valley the fit could not settle.
The second is the cost of switching to QAT while the model is young (switching at 1 - f of the
schedule): nearly independent of the bit width in our runs, and gone once the switch comes late
(tau is a share of the schedule).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qat_jax.law.form import (
    D_UNIT,
    FP_BITS,
    LN2,
    N_UNIT,
    Form,
    LawError,
    bool_option,
    check_qat_runs,
    natural_exp,
    needs_cooldown,
    pinner,
    qat_grid_for,
    register,
)
from qat_jax.law.runs import Runs

FP_PARAMS = ("e", "a", "b", "beta", "log_g", "sigma", "log_w", "zeta")
TPP_PARAMS = ("upsilon",)  # with anneal_tpp: w_eff = w (d / n)^-upsilon
# with saturation=power: the gain g is a constant and each LR drop realises 1 - (1 + x)^-b of
# its share (the multi-power law's own G, b finite), in place of g d^sigma and 1 - exp(-x)
POWER_FP_PARAMS = tuple("log_b" if k == "sigma" else k for k in FP_PARAMS)
SATURATIONS = ("exp", "power")
PENALTY_PARAMS = ("log_theta", "kappa", "gamma", "eta", "omega", "log_lambda", "mu", "nu",
                  "xi", "log_tau")
QAT_WSD_PARAMS = FP_PARAMS + TPP_PARAMS + PENALTY_PARAMS
STARTS = 256
# Start ranges. The coefficients a and b are drawn as the log of the term's size at the
# table's median n and s1 (`_fp_grid`), so that they fit any scale of N and D.
FP_RANGES = {"e_share": (0.2, 0.9), "term": (-3.0, 0.5), "beta": (0.2, 1.5),
             "log_g": (-5.0, -1.0), "sigma": (0.0, 1.5), "log_w": (8.0, 13.0),
             "zeta": (0.0, 1.5), "upsilon": (-0.5, 0.5), "log_b": (-2.5, 0.5)}
PENALTY_RANGES = {"log_theta": (-4.0, 0.0), "kappa": (0.5, 1.5), "gamma": (0.0, 1.0),
                  "eta": (-0.5, 0.5), "omega": (0.0, 0.5),
                  "log_lambda": (-3.0, 1.0), "mu": (-0.5, 0.5), "nu": (-0.5, 0.5),
                  "xi": (0.0, 2.0), "log_tau": (-3.0, -1.0)}

# Gauss-Legendre nodes and weights on [0, 1]: h's integral over the LR level v
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(24)
_V, _WV = (_NODES + 1.0) / 2.0, _WEIGHTS / 2.0


def annealed_share(D_cool, log_w, zeta, log_b=None):
    """h(D_cool): the share of the full annealing gain that a linear LR cooldown of D_cool tokens
    realises (0 without a cooldown, -> 1 for a long one); see the module docstring. With
    `log_b` each drop realises 1 - (1 + x)^-b (saturation=power), else 1 - exp(-x)."""
    x = (D_cool * jnp.exp(-log_w))[..., None] * _V ** (2.0 - zeta) / 2.0
    if log_b is None:
        return jnp.sum(_WV * -jnp.expm1(-x), axis=-1)
    return jnp.sum(_WV * -jnp.expm1(-jnp.exp(log_b) * jnp.log1p(x)), axis=-1)


def fp_loss(p, N, D, D_cool):
    """L_fp(N, D, D_cool): the full-precision loss under a WSD schedule whose final linear
    cooldown is D_cool tokens (module docstring; upsilon, where p has it, scales w)."""
    log_n = jnp.log(N / N_UNIT)
    log_w = p["log_w"]
    if "upsilon" in p:  # anneal_tpp: w_eff = w (d / n)^-upsilon
        log_w = log_w - p["upsilon"] * (jnp.log(D / D_UNIT) - log_n)
    log_s1 = jnp.log(jnp.maximum(D - 0.5 * D_cool, 1.0) / D_UNIT)
    constant = (jnp.exp(p["e"]) + jnp.exp(p["a"] - p["beta"] * log_n)
                + jnp.exp(p["b"] - p["beta"] * log_s1))
    if "log_b" in p:  # saturation=power: a constant gain, realised as the multi-power law does
        gain = jnp.exp(p["log_g"])
    else:
        gain = jnp.exp(p["log_g"] + p["sigma"] * jnp.log(D / D_UNIT))
    gain = constant * -jnp.expm1(-gain / constant)
    return constant - gain * annealed_share(D_cool, log_w, p["zeta"], p.get("log_b"))


def penalty(p, N, D_fp, D_qat, B):
    """P, the QAT penalty (module docstring), 0 for a run without QAT; and the mask of B-bit
    rows without QAT tokens (post-training quantization, which this law does not model)."""
    quantized = B < FP_BITS
    qat = quantized & (D_qat > 0)
    D = D_fp + D_qat
    f = jnp.where(qat, D_qat / D, 1.0)  # where-masked: no log of 0
    log_n, log_d = jnp.log(N / N_UNIT), jnp.log(D / D_UNIT)
    damage = jnp.exp(p["log_theta"] - p["kappa"] * B * LN2 + p["gamma"] * log_d
                     - p["eta"] * log_n)
    unrecovered = jnp.exp(-p["omega"] * jnp.log(f))
    early = jnp.exp(p["log_lambda"] - p["mu"] * B * LN2 - p["nu"] * log_n - p["xi"] * log_d
                    - (1.0 - f) * jnp.exp(-p["log_tau"]))
    return jnp.where(qat, damage * unrecovered + early, 0.0), quantized & ~qat


def _natural(p) -> dict:
    out = {"E": natural_exp(p["e"]), "A": natural_exp(p["a"]), "B": natural_exp(p["b"]),
           "beta": p["beta"], "g": natural_exp(p["log_g"])}
    if "log_b" in p:
        out["b_sat"] = natural_exp(p["log_b"])
    else:
        out["sigma"] = p["sigma"]
    out.update({"w": natural_exp(p["log_w"]), "zeta": p["zeta"]})
    if "upsilon" in p:
        out["upsilon"] = p["upsilon"]
    out.update({k.removeprefix("log_"): (natural_exp(v) if k.startswith("log_") else v)
                for k, v in p.items() if k in PENALTY_PARAMS})
    return out


def _fp_grid(runs: Runs, pinned: dict, tpp: bool = False, power: bool = False) -> np.ndarray:
    """STARTS seeded random starts of the FP part, scaled to the table: E a share of its
    lowest loss, each power-law term between e^-3 and e^0.5 nats at the median n and s1 (and
    with `tpp`, upsilon from a stream of its own: the other starts stay those without it; with
    `power`, log b from a stream of its own in sigma's place)."""
    rng = np.random.default_rng(0)
    u = {k: rng.uniform(*r, STARTS) for k, r in FP_RANGES.items()}
    med_n = np.log(np.median(runs.N) / N_UNIT)
    med_d = np.log(np.median(runs.D_fp + runs.D_qat) / D_UNIT)
    e = np.log(u["e_share"] * np.min(runs.loss))
    a = u["term"] + u["beta"] * med_n
    b = rng.uniform(*FP_RANGES["term"], STARTS) + u["beta"] * med_d
    sat = np.random.default_rng(2).uniform(*FP_RANGES["log_b"], STARTS) if power else u["sigma"]
    starts = [e, a, b, u["beta"], u["log_g"], sat, u["log_w"], u["zeta"]]
    if tpp:
        starts.append(np.random.default_rng(1).uniform(*FP_RANGES["upsilon"], STARTS))
    return np.stack(starts, -1)


def _saturation(name: str, value) -> str:
    if value not in SATURATIONS:
        raise LawError(f"the {name!r} law's option saturation={value!r}; valid: {SATURATIONS}")
    return value


def wsd_fp_form(anneal_tpp: bool = False, saturation: str = "exp") -> Form:
    """The full-precision part of `qat_wsd` on its own (fitted to FP runs; the QAT law's
    starts); anneal_tpp and saturation as in `qat_wsd_form`."""
    tpp = bool_option("chinchilla_wsd", "anneal_tpp", anneal_tpp)
    power = _saturation("chinchilla_wsd", saturation) == "power"
    params = (POWER_FP_PARAMS if power else FP_PARAMS) + (TPP_PARAMS if tpp else ())
    return Form("chinchilla_wsd", params,
                lambda p, N, D_fp, D_qat, B, M, D_cool, L_ctrl: jnp.log(
                    jnp.maximum(fp_loss(p, N, D_fp + D_qat, D_cool), 1e-9)),
                lambda runs, pinned, fit: _fp_grid(runs, pinned, tpp, power), _natural,
                "E + A / n^beta + B / s1^beta (s1: the LR area) less the cooldown's realised "
                "annealing gain (multi-power law" + ("; its LR area scale by tokens per "
                "parameter" if tpp else "") + ("; a constant gain, power saturation)" if power
                                              else ")"),
                scout_iter=50, polish=32, max_iter=2000,
                options={"anneal_tpp": tpp, "saturation": saturation}, variant=wsd_fp_form,
                floor=False, file_defaults={"anneal_tpp": False, "saturation": "exp"},
                check_runs=needs_cooldown("chinchilla_wsd"))


chinchilla_wsd = register(wsd_fp_form())


def qat_wsd_form(pin_fp: bool = False, anneal_tpp: bool = False,
                 saturation: str = "exp") -> Form:
    """[ours] The WSD law: L_fp(N, D, D_cool) + P (module docstring). pin_fp=True fits the FP
    part to the full-precision runs first and holds it; the default fits all 18 parameters
    jointly (the fused QAT runs' cooldowns inform the FP part's schedule terms too).
    anneal_tpp=True scales the cooldown's LR area window by tokens per parameter (upsilon; 19
    parameters); the default holds it fixed (the study's held-out check rejects upsilon:
    METHOD.md 3c). saturation='power' replaces g d^sigma and 1 - exp(-x) by a constant g and
    the multi-power law's 1 - (1 + x)^-b (the variant the committed study chooses)."""
    pin_fp = bool_option("qat_wsd", "pin_fp", pin_fp)
    tpp = bool_option("qat_wsd", "anneal_tpp", anneal_tpp)
    fp_form = wsd_fp_form(tpp, _saturation("qat_wsd", saturation))
    params = fp_form.params + PENALTY_PARAMS

    def log_loss(p, N, D_fp, D_qat, B, M, D_cool, L_ctrl):
        pen, ptq = penalty(p, N, D_fp, D_qat, B)
        loss = fp_loss(p, N, D_fp + D_qat, D_cool) + pen
        return jnp.where(ptq, jnp.inf, jnp.log(jnp.maximum(loss, 1e-9)))

    def check(runs: Runs, where: str):
        needs_cooldown("qat_wsd")(runs, where)
        check_qat_runs(runs, where)

    return Form("qat_wsd", params, log_loss,
                qat_grid_for(fp_form, params, PENALTY_RANGES), _natural,
                f"L_fp(N, D, D_cool) (WSD: LR area and realised annealing gain"
                f"{', its LR area scale by tokens per parameter' if tpp else ''}; "
                f"{'pinned by the FP runs' if pin_fp else 'fitted jointly'}) + QAT damage, its "
                f"unrecovered share and the cost of an early switch",
                scout_iter=50, polish=32, max_iter=2000,
                options={"pin_fp": pin_fp, "anneal_tpp": tpp, "saturation": saturation},
                variant=qat_wsd_form, floor=False,
                file_defaults={"anneal_tpp": False, "saturation": "exp"},
                pinned=pinner(fp_form) if pin_fp else (lambda runs, fit: {}),
                check_runs=check)


qat_wsd = register(qat_wsd_form())
