"""The paper's law forms (METHOD.md sections 2 and 3): tokens per parameter byte, the closed-form
optimal QAT fraction f*(S) of Dremov et al. (ICLR 2026), Chinchilla, and the QAT law.

S = D / M is a run's total tokens over the size of its B-bit model in bytes. The paper takes
M = N B / 8 (every parameter at B bits); a runs table may give each run's served bytes instead
(column `model_bytes`, as `qat-jax sweep` writes it: sizes.served_bytes, docs/configs.md
"Model bytes"), and the law then reads those. The paper
fits one curve for the loss-optimal QAT fraction over all model sizes and bit widths,
f*(S) = exp(-a / ln S) with a = 6.7297 (mean absolute error 0.091). It is defined for S > 1
only: at S <= 1, ln S <= 0 and the formula leaves [0, 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qat_jax.law.form import (
    FP_BITS,
    LN2,
    Form,
    bool_option,
    check_qat_runs,
    natural_exp,
    pinner,
    positive_option,
    qat_grid_for,
    register,
)
from qat_jax.law.runs import LawError, param_bytes

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



S_FP_FLOOR = 1e-3  # [ours] default floor of S_fp in the QAT law (QAT from scratch: S_fp = 0)


def _product(*axes) -> np.ndarray:
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))


def chin_terms(p, N, D):
    return [jnp.broadcast_to(p["e"], jnp.shape(N)), p["a"] - p["alpha"] * jnp.log(N),
            p["b"] - p["beta"] * jnp.log(D)]


def chin_natural(p):
    return {"E": natural_exp(p["e"]), "A": natural_exp(p["a"]), "alpha": p["alpha"],
            "B": natural_exp(p["b"]), "beta": p["beta"]}


# Chinchilla (Hoffmann et al. 2022) in log-sum-exp form, as Epoch AI's replication fits it:
# log L = LSE(a - alpha log N, b - beta log D, e); D is all tokens of the run.
CHINCHILLA_GRID = _product(np.arange(0, 26, 5.0), np.arange(0, 26, 5.0),
                           np.arange(-1, 1.01, 0.5), np.arange(0, 2.01, 0.5),
                           np.arange(0, 2.01, 0.5))  # a, b, e, alpha, beta: 4,500 starts
chinchilla = register(Form(
    "chinchilla", ("a", "b", "e", "alpha", "beta"),
    lambda p, N, D_fp, D_qat, B, M, D_cool, L_ctrl: jax.nn.logsumexp(
        jnp.stack(chin_terms(p, N, D_fp + D_qat)), axis=0),
    lambda runs, pinned, fit: CHINCHILLA_GRID, chin_natural,
    "E + A / N^alpha + B / D^beta, D = D_fp + D_qat"))

QAT_PARAMS = ("a", "b", "e", "alpha", "beta", "log_theta", "kappa", "log_phi", "chi", "psi",
              "omega", "log_lambda", "mu", "nu", "xi", "rho")
# Ranges of the QAT terms' start points (sampled; the Chinchilla part starts from a fit).
QAT_START_RANGES = {"log_theta": (-5, 1), "kappa": (0.2, 1.5), "log_phi": (-3, 3),
                    "chi": (0.0, 1.5), "psi": (0.0, 0.5), "omega": (0.0, 1.0),
                    "log_lambda": (-3, 3), "mu": (0.0, 1.5), "nu": (0.0, 0.5),
                    "xi": (-0.5, 0.5), "rho": (0.0, 1.0)}


CHINCHILLA_TOKENS = ("total", "fp")  # which D the QAT law's Chinchilla part reads


def delta_terms(p, N, D_fp, D_qat, B, M, s_fp_floor: float):
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
        (`delta_terms`; 0 for a full-precision run, B >= 16); with chinchilla_tokens="fp",
        Chinchilla's D = D_fp, floored at S_fp = s_fp_floor [ours]."""
        D = (D_fp + D_qat if chinchilla_tokens == "total"
             else jnp.maximum(D_fp, s_fp_floor * M))
        delta, ptq = delta_terms(p, N, D_fp, D_qat, B, M, s_fp_floor)
        log_loss = jax.nn.logsumexp(jnp.stack(chin_terms(p, N, D) + delta), axis=0)
        return jnp.where(ptq, jnp.inf, log_loss)

    return log_loss


def qat_natural(p):
    out = chin_natural(p)
    out.update({k: (natural_exp(v) if k.startswith("log_") else v) for k, v in p.items()
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
    s_fp_floor = positive_option("qat", "s_fp_floor", s_fp_floor)
    pin_fp = bool_option("qat", "pin_fp", pin_fp)
    d = "D_fp + D_qat" if chinchilla_tokens == "total" else "D_fp"
    pinned = "pinned by the FP runs" if pin_fp else "fitted jointly"
    return Form("qat", QAT_PARAMS, _qat_log_loss_fn(chinchilla_tokens, s_fp_floor),
                qat_grid_for("chinchilla", QAT_PARAMS, QAT_START_RANGES),
                qat_natural, f"L_chin(N, {d}) ({pinned}) + QAT terms (METHOD.md section 3), "
                f"S_fp >= {s_fp_floor:g}", scout_iter=50, polish=32, max_iter=2000,
                options={"chinchilla_tokens": chinchilla_tokens, "s_fp_floor": s_fp_floor,
                         "pin_fp": pin_fp},
                variant=qat_form,
                pinned=pinner("chinchilla") if pin_fp else (lambda runs, fit: {}),
                check_runs=check_qat_runs)


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
