"""The quantized matrices of a decoder's parameter tree (quantizers: qat_jax/quant.py): each
Dense kernel with its scale and the tied embedding (or an untied head) at max(B, 4) bits;
their scales set at the FP -> QAT switch, the served (fake-quantized) weights, and the
quantizers' health metrics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from qat_jax.layout import restack_layers, unstack_layers
from qat_jax.quant import (
    SCALE_FLOOR,
    QuantConfig,
    Quantizer,
    embedding_bits,
    fake_quant,
    floored_view,
    init_scale,
    quantizer,
    ste_fake_quant,
    stored_scale,
)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """One quantized matrix of a decoder's parameter tree."""

    weight_path: tuple[str, ...]  # e.g. ("block_0", "attn", "q", "kernel"), or ("embed",)
    scale_path: tuple[str, ...]  # its scale parameter
    w_IO: jax.Array  # as quantized: the tied embedding as the head's embed^T
    alpha: jax.Array
    quantizer: Quantizer
    group: int  # G of per-group scales, else 0
    transposed: bool  # w_IO is the parameter transposed (the embedding)

    @property
    def bits(self) -> float:
        return self.quantizer.bits


def quantized_pairs(params, q: QuantConfig) -> list[Quantized]:
    """Every quantized matrix: each Dense's kernel with its quant_scale, and the tied embedding
    (as the head's embed^T, at max(B, 4) bits) when quant.quantize_embedding is set. A scanned
    model's matrices come one layer at a time, with the loop's paths (unstack_layers)."""
    params = unstack_layers(params)
    flat = traverse_util.flatten_dict(params)
    qz = quantizer(q.bits)
    out = [Quantized(path, (*path[:-1], "quant_scale"), w,
                     stored_scale(flat[(*path[:-1], "quant_scale")], q.scale_dtype,
                                  qz.block_scale), qz, q.group, False)
           for path, w in flat.items()
           if path[-1] == "kernel" and (*path[:-1], "quant_scale") in flat]
    if q.quantize_embedding:  # the embedding, and an untied head: [V, D] tables
        qz = quantizer(embedding_bits(q.bits))
        out += [Quantized((name,), (f"{name}_quant_scale",), params[name].T,
                          stored_scale(params[f"{name}_quant_scale"], q.scale_dtype,
                                       qz.block_scale), qz, q.group, True)
                for name in ("embed", "head") if name in params]
    return out


def init_scales(params, q: QuantConfig):
    """A copy of `params` with every quantizer scale set from its weight (init_scale): what the
    FP -> QAT switch calls. Unquantized parts are returned unchanged."""
    flat = traverse_util.flatten_dict(unstack_layers(params))
    for m in quantized_pairs(params, q):
        flat[m.scale_path] = init_scale(m.w_IO, m.quantizer, q.granularity, q.group_size)
    return restack_layers(traverse_util.unflatten_dict(flat), params)


def served_params(params, q: QuantConfig):
    """`params` in the loop layout with every quantized matrix replaced by its fake-quantized
    weight: the full-precision model on them is the quantized model (what generation and the
    export run)."""
    flat = traverse_util.flatten_dict(unstack_layers(params))
    for m in quantized_pairs(params, q):
        w = fake_quant(m.w_IO, m.alpha, m.quantizer, m.group)
        flat[m.weight_path] = w.T if m.transposed else w
    return traverse_util.unflatten_dict(flat)


def bits_label(bits) -> str:
    """A bit width as metric keys spell it: 6 -> '6b', 1.58 -> '1.58b'."""
    return f"{bits:g}b"


def quant_metrics(params, q: QuantConfig) -> dict:
    """Quantizer health over all quantized weights, and per bit width (keys suffixed '_6b')
    when the run has several (the embedding at max(B, 4) bits):
    `clip_frac`, the fraction of weights outside the quantizer's range (they get no
    straight-through gradient); `quant_err`, |W - W_q| / |W| (Frobenius norms summed over the
    matrices); `dead_frac`, the fraction of scales at SCALE_FLOOR (a floored scale gets no
    gradient and clips its whole channel: the channel is dead); `dead_scales`, their count."""
    sums: dict = {}
    for m in quantized_pairs(params, q):
        w, alpha = floored_view(m.w_IO, m.alpha, m.group)
        s = sums.setdefault(m.bits, [0.0, 0, 0.0, 0.0, 0, 0])
        s[0] += jnp.sum(~m.quantizer.inside(w / alpha))
        s[1] += w.size
        s[2] += jnp.sum((w - ste_fake_quant(w, alpha, m.quantizer)) ** 2)
        s[3] += jnp.sum(w ** 2)
        s[4] += jnp.sum(m.alpha <= SCALE_FLOOR)
        s[5] += m.alpha.size

    def health(clipped, total, err2, norm2, dead, scales):
        return {"clip_frac": clipped / total, "quant_err": jnp.sqrt(err2 / norm2),
                "dead_frac": dead / scales, "dead_scales": dead}

    out = health(*(sum(s[i] for s in sums.values()) for i in range(6)))
    if len(sums) > 1:
        for bits, s in sums.items():
            out.update({f"{k}_{bits_label(bits)}": v for k, v in health(*s).items()})
    return out
