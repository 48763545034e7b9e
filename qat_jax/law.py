"""Scaling-law maths (METHOD.md sections 2 and 3): tokens per parameter byte and the
closed-form optimal QAT fraction f*(S) of Dremov et al. (ICLR 2026).

S = D / (N B / 8) is a run's total tokens over the size of its B-bit model in bytes. The paper
fits one curve for the loss-optimal QAT fraction over all model sizes and bit widths,
f*(S) = exp(-a / ln S) with a = 6.7297 (mean absolute error 0.091). It is defined for S > 1
only: at S <= 1, ln S <= 0 and the formula leaves [0, 1).
"""

from __future__ import annotations

import math

CLOSED_FORM_A = 6.7297  # a of f*(S) = exp(-a / ln S) [paper]


def tokens_per_param_byte(tokens: float, params: float, bits: float) -> float:
    """S = D / (N B / 8)."""
    if params <= 0 or bits <= 0:
        raise ValueError(f"S needs N > 0 and B > 0 (got N={params}, B={bits})")
    return tokens / (params * bits / 8.0)


def closed_form_fraction(S: float, a: float = CLOSED_FORM_A) -> float:
    """f*(S) = exp(-a / ln S), the paper's loss-optimal QAT fraction; ValueError for S <= 1."""
    if not S > 1.0:
        raise ValueError(f"f*(S) = exp(-a / ln S) is defined for S > 1 tokens per parameter "
                         f"byte only; this budget has S = {S:.4g}")
    return math.exp(-a / math.log(S))
