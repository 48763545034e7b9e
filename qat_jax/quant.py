"""Weight quantizer numerics (the ParetoQ family, METHOD.md section 5): straight-through fake
quantization with learned scales, scale initialisation, and integer codes packed densely.

A weight matrix w_IO (input x output) is quantized with a scale alpha that broadcasts against
it: per output channel alpha_1O, per tensor alpha_11, or per group of G input weights, where
w_IO is viewed as w_KGO (K = I / G groups) with alpha_K1O. The quantizer works on q = w / alpha
(alpha floored at SCALE_FLOOR); "sums over the input dimension" run over the axes alpha
broadcasts along; n is the number of weights in the whole matrix.

| bits          | kind | forward W_q / alpha                             | levels        |
| 1             | sign | sign(q)                                         | +-1           |
| 1.58 (tern.)  | SEQ  | round(clip(q, -c, c) * 1.5) / 1.5               | 0, +-2/3      |
| 2             | SEQ  | (round(clip(q, -c, c) * 2 - 0.5) + 0.5) / 2     | +-1/4, +-3/4  |
| 3, 4, 5, 6, 8 | LSQ  | clip(round(q), Qn, Qp), Qn = -2^(b-1), Qp = 2^(b-1) - 1 | integers |

Shape key: I input dim, O output dim, K groups, G group size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

BITS = (1, 1.58, 2, 3, 4, 5, 6, 8)
TERNARY = 1.58
SCALE_FLOOR = 1e-5  # alpha is floored here, forward and backward (ParetoQ)
SEQ_CLIP = 0.99  # c: SEQ clips q to [-c, c] before rounding
GRANULARITIES = ("channel", "tensor", "group")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """config.quant, typed: what the model and the parameter-tree helpers below read."""

    bits: float | None = None  # None: full precision
    granularity: str = "channel"
    group_size: int = 0
    quantize_embedding: bool = False

    @classmethod
    def from_config(cls, config) -> QuantConfig:
        q = config.quant
        return cls(q.bits, q.granularity, q.group_size, q.quantize_embedding)


def check_bits(bits) -> float:
    if bits not in BITS:
        raise ValueError(f"quant.bits={bits!r} is not supported; valid: {list(BITS)} "
                         f"(None for full precision)")
    return bits


def embedding_bits(bits) -> float:
    """The tied embedding / head is quantized to max(B, 4) bits (as in the paper)."""
    return max(bits, 4)


def kind(bits) -> str:
    check_bits(bits)
    return "sign" if bits == 1 else "seq" if bits in (TERNARY, 2) else "lsq"


def lsq_range(bits) -> tuple[int, int]:
    """(Qn, Qp) of a b-bit LSQ quantizer."""
    b = int(bits)
    return -(2 ** (b - 1)), 2 ** (b - 1) - 1


def seq_outer(bits) -> float:
    """Qp' of SEQ's scale gradient outside [-c, c]: 0.75 at 2 bits, 1.0 for ternary (ParetoQ's
    code uses 1.0 there, not the top level 2/3; kept so runs compare with theirs)."""
    return 0.75 if bits == 2 else 1.0


def levels(q, bits):
    """The forward's W_q / alpha as a function of q = W / alpha."""
    k = kind(bits)
    if k == "sign":
        return jnp.sign(q)
    if k == "seq":
        clipped = jnp.clip(q, -SEQ_CLIP, SEQ_CLIP)
        if bits == TERNARY:
            return jnp.round(clipped * 1.5) / 1.5
        return (jnp.round(clipped * 2.0 - 0.5) + 0.5) / 2.0
    qn, qp = lsq_range(bits)
    return jnp.clip(jnp.round(q), qn, qp)


def _broadcast_axes(x_shape, shape) -> tuple[int, ...]:
    """The axes along which a tensor of `shape` (same rank) broadcasts against x_shape."""
    return tuple(i for i, (a, b) in enumerate(zip(x_shape, shape, strict=True))
                 if b == 1 and a != 1)


def _sum_to(x, shape):
    """Sum x over the axes alpha broadcasts along: the per-channel (group) reduction."""
    return jnp.sum(x, axis=_broadcast_axes(x.shape, shape), keepdims=True)


def inside_range(q, bits):
    """Where q = W / alpha lies inside the quantizer's range (its straight-through gradient
    passes): sign |q| <= 1, SEQ |q| <= c, LSQ Qn <= q <= Qp."""
    k = kind(bits)
    if k == "sign":
        return jnp.abs(q) <= 1.0
    if k == "seq":
        return jnp.abs(q) <= SEQ_CLIP
    qn, qp = lsq_range(bits)
    return (q >= qn) & (q <= qp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fake_quant(w, alpha, bits):
    return alpha * levels(w / alpha, bits)


def _fake_quant_fwd(w, alpha, bits):
    return _fake_quant(w, alpha, bits), (w, alpha)


def _fake_quant_bwd(bits, res, g):
    """The straight-through estimator (ParetoQ / LSQ):
    - dW passes the upstream gradient g where q lies inside the quantizer's range and is 0
      where q was clipped (sign: |q| <= 1; SEQ: |q| <= c; LSQ: Qn <= q <= Qp);
    - dalpha = sum over the channel (group) of g * e, scaled by 1/sqrt(n) (1/sqrt(n * Qp) for
      LSQ), with e the quantization residual level(q) - q inside the range and the clipped
      level outside it (sign: e = sign(W), unmasked)."""
    w, alpha = res
    q = w / alpha
    k = kind(bits)
    if k == "sign":
        e = jnp.sign(w)
        scale = 1.0 / math.sqrt(w.size)
    elif k == "seq":
        outer = seq_outer(bits)
        e = jnp.where(q < -SEQ_CLIP, -outer, jnp.where(q > SEQ_CLIP, outer, levels(q, bits) - q))
        scale = 1.0 / math.sqrt(w.size)
    else:
        qn, qp = lsq_range(bits)
        e = jnp.where(q < qn, qn, jnp.where(q > qp, qp, jnp.round(q) - q))
        scale = 1.0 / math.sqrt(w.size * qp)
    dw = jnp.where(inside_range(q, bits), g, 0.0).astype(w.dtype)
    dalpha = (_sum_to(g * e, alpha.shape) * scale).astype(alpha.dtype)
    return dw, dalpha


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def scale_shape(w_shape: tuple[int, int], granularity: str, group_size: int = 0):
    """Shape of alpha for a weight of shape (I, O)."""
    n_in, n_out = w_shape
    if granularity == "channel":
        return (1, n_out)
    if granularity == "tensor":
        return (1, 1)
    if granularity == "group":
        if group_size <= 0 or n_in % group_size:
            raise ValueError(f"quant.group_size={group_size} must be positive and divide the "
                             f"input dimension {n_in}")
        return (n_in // group_size, 1, n_out)
    raise ValueError(f"quant.granularity={granularity!r}; valid: {GRANULARITIES}")


def _floored_view(w_IO, alpha):
    """(w viewed against alpha: w_KGO for rank-3 per-group scales, else w_IO; alpha floored at
    SCALE_FLOOR, ParetoQ's floor: a floored scale gets no gradient, as through torch.where)."""
    alpha = jnp.where(alpha > SCALE_FLOOR, alpha, SCALE_FLOOR).astype(w_IO.dtype)
    if alpha.ndim == 3:
        return w_IO.reshape(alpha.shape[0], -1, w_IO.shape[1]), alpha
    return w_IO, alpha


def fake_quant(w_IO, alpha, bits):
    """The fake-quantized weight (same shape and dtype as w_IO), differentiable in both w and
    alpha through the straight-through estimator. alpha has shape scale_shape(...); a rank-3
    alpha means per-group scales."""
    check_bits(bits)
    w, alpha = _floored_view(w_IO, alpha)
    return _fake_quant(w, alpha, bits).reshape(w_IO.shape)


def init_scale(w_IO, bits, granularity: str = "channel", group_size: int = 0):
    """alpha at the FP -> QAT switch: mean |W| (1 bit), max |W| (SEQ), max |W| / Qp (LSQ),
    over each channel, group or the whole tensor."""
    shape = scale_shape(w_IO.shape, granularity, group_size)
    w = w_IO.reshape(shape[0], -1, w_IO.shape[1]) if len(shape) == 3 else w_IO
    a = jnp.abs(w)
    k = kind(bits)
    stat = _mean_to if k == "sign" else _max_to
    alpha = stat(a, shape)
    if k == "lsq":
        alpha = alpha / lsq_range(bits)[1]
    return alpha.astype(jnp.float32)


def _mean_to(x, shape):
    return _sum_to(x, shape) / (x.size // math.prod(shape))


def _max_to(x, shape):
    return jnp.max(x, axis=_broadcast_axes(x.shape, shape), keepdims=True)


# ----------------------------------------------------------------------------- parameter trees


@dataclasses.dataclass(frozen=True)
class Quantized:
    """One quantized matrix of a decoder's parameter tree."""

    weight_path: tuple[str, ...]  # e.g. ("block_0", "attn", "q", "kernel"), or ("embed",)
    scale_path: tuple[str, ...]  # its scale parameter
    w_IO: jax.Array  # as quantized: the tied embedding as the head's embed^T
    alpha: jax.Array
    bits: float
    transposed: bool  # w_IO is the parameter transposed (the embedding)


# model.scan_layers: the blocks' parameters live stacked under params[SCANNED][SCANNED_BLOCK]
# with a leading layer axis, where the loop has params["block_0"], params["block_1"], ...
SCANNED, SCANNED_BLOCK = "blocks", "block"


def unstack_layers(params):
    """A scanned model's parameters in the loop's layout (block_0, block_1, ...); any other
    tree unchanged. Every function below reads matrices one layer at a time through this."""
    if SCANNED not in params:
        return params
    stacked = params[SCANNED][SCANNED_BLOCK]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != SCANNED}
    out.update({f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)})
    return out


def restack_layers(unstacked, like):
    """The inverse of unstack_layers, for a tree shaped like `like`."""
    if SCANNED not in like:
        return unstacked
    n = jax.tree.leaves(like[SCANNED])[0].shape[0]
    blocks = [unstacked[f"block_{i}"] for i in range(n)]
    out = {k: v for k, v in unstacked.items() if not k.startswith("block_")}
    out[SCANNED] = {SCANNED_BLOCK: jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return out


def quantized_pairs(params, q: QuantConfig) -> list[Quantized]:
    """Every quantized matrix: each Dense's kernel with its quant_scale, and the tied embedding
    (as the head's embed^T, at max(B, 4) bits) when quant.quantize_embedding is set. A scanned
    model's matrices come one layer at a time, with the loop's paths (unstack_layers)."""
    params = unstack_layers(params)
    out = []

    def visit(tree, path):
        if "kernel" in tree and "quant_scale" in tree:
            out.append(Quantized((*path, "kernel"), (*path, "quant_scale"), tree["kernel"],
                                 tree["quant_scale"], q.bits, False))
        for key, sub in tree.items():
            if isinstance(sub, dict):
                visit(sub, (*path, key))

    visit(params, ())
    if q.quantize_embedding:
        out.append(Quantized(("embed",), ("embed_quant_scale",), params["embed"].T,
                             params["embed_quant_scale"], embedding_bits(q.bits), True))
    return out


def init_scales(params, q: QuantConfig):
    """A copy of `params` with every quantizer scale set from its weight (init_scale): what the
    FP -> QAT switch calls. Unquantized parts are returned unchanged."""
    check_bits(q.bits)
    new = jax.tree.map(lambda x: x, unstack_layers(params))  # a structural copy
    for m in quantized_pairs(params, q):
        *parents, leaf = m.scale_path
        node = new
        for key in parents:
            node = node[key]
        node[leaf] = init_scale(m.w_IO, m.bits, q.granularity, q.group_size)
    return restack_layers(new, params)


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
        w, alpha = _floored_view(m.w_IO, m.alpha)
        s = sums.setdefault(m.bits, [0.0, 0, 0.0, 0.0, 0, 0])
        s[0] += jnp.sum(~inside_range(w / alpha, m.bits))
        s[1] += w.size
        s[2] += jnp.sum((w - _fake_quant(w, alpha, m.bits)) ** 2)
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


# ----------------------------------------------------------------------------- integer codes


def n_codes(bits) -> int:
    """Distinct levels of a bit width."""
    return {"sign": 2, "seq": 3 if bits == TERNARY else 4}.get(kind(bits), 2 ** int(bits))


def to_codes(w_IO, alpha, bits) -> np.ndarray:
    """Unsigned integer codes 0 .. n_codes-1 of the fake-quantized weight (sign(0) is coded as
    +1: the one point where the 1-bit export differs from sign(W) = 0)."""
    alpha = np.maximum(np.asarray(alpha, np.float32), SCALE_FLOOR)
    w = np.asarray(w_IO, np.float32)
    w = w.reshape(alpha.shape[0], -1, w.shape[1]) if alpha.ndim == 3 else w
    lev = np.asarray(levels(jnp.asarray(w / alpha), bits))
    k = kind(bits)
    if k == "sign":
        codes = (lev >= 0).astype(np.int64)
    elif bits == TERNARY:
        codes = np.rint(lev * 1.5).astype(np.int64) + 1
    elif k == "seq":
        codes = np.rint(lev * 2.0 + 1.5).astype(np.int64)
    else:
        codes = np.rint(lev).astype(np.int64) - lsq_range(bits)[0]
    return codes.reshape(np.shape(w_IO)).astype(np.uint8 if n_codes(bits) <= 256 else np.uint16)


def from_codes(codes_IO, alpha, bits, dtype=np.float32) -> np.ndarray:
    """The dequantized weight alpha * level(code)."""
    c = np.asarray(codes_IO).astype(np.float32)
    k = kind(bits)
    if k == "sign":
        lev = 2.0 * c - 1.0
    elif bits == TERNARY:
        lev = (c - 1.0) / 1.5
    elif k == "seq":
        lev = (c - 1.5) / 2.0
    else:
        lev = c + lsq_range(bits)[0]
    alpha = np.maximum(np.asarray(alpha, np.float32), SCALE_FLOOR)
    if alpha.ndim == 3:
        lev = lev.reshape(alpha.shape[0], -1, lev.shape[-1])
    return (alpha * lev).reshape(np.shape(codes_IO)).astype(dtype)


def packed_bits(bits) -> float:
    """Storage bits per weight: ternary packs 5 trits per byte (1.6 bits)."""
    return 1.6 if bits == TERNARY else float(int(bits))


def pack(codes: np.ndarray, bits) -> np.ndarray:
    """Codes (any shape, flattened in C order) packed densely into uint8: b bits each,
    little-endian within the stream; ternary as base-3 digits, 5 per byte."""
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if bits == TERNARY:
        flat = np.concatenate([flat, np.zeros((-len(flat)) % 5, np.int64)]).reshape(-1, 5)
        return (flat @ (3 ** np.arange(5))).astype(np.uint8)
    b = int(bits)
    bit_matrix = (flat[:, None] >> np.arange(b)) & 1
    return np.packbits(bit_matrix.reshape(-1).astype(np.uint8), bitorder="little")


def unpack(packed: np.ndarray, bits, count: int) -> np.ndarray:
    """Inverse of `pack`: the first `count` codes."""
    packed = np.asarray(packed, np.uint8)
    if bits == TERNARY:
        digits = (packed.astype(np.int64)[:, None] // (3 ** np.arange(5))) % 3
        return digits.reshape(-1)[:count].astype(np.uint8)
    b = int(bits)
    stream = np.unpackbits(packed, bitorder="little")[:count * b].reshape(count, b)
    return (stream.astype(np.int64) << np.arange(b)).sum(axis=1).astype(
        np.uint8 if b <= 8 else np.uint16)
