"""Weight quantizer numerics (the ParetoQ family, docs/METHOD.md section 5): straight-through
fake quantization with learned scales, scale initialisation, and integer codes packed densely.

A weight matrix w_IO (input x output) is quantized with a scale alpha that broadcasts against
it: per output channel alpha_1O, per tensor alpha_11, or per group of G input weights, where
w_IO is viewed as w_KGO (K = I / G groups) with alpha_K1O (a `group_size` G > 0, given
explicitly). The quantizer works on q = w / alpha (alpha floored at SCALE_FLOOR); "sums over
the input dimension" run over the axes alpha broadcasts along; n is the number of weights in
the whole matrix.

Each bit width is one `Quantizer` object (`quantizer(bits)`), in one of three families:

| bits          | family    | forward W_q / alpha                              | levels       |
| 1             | Sign      | sign(q)                                          | +-1          |
| 1.58 (tern.)  | Ternary   | round(clip(q, -c, c) * 1.5) / 1.5 (SEQ)          | 0, +-2/3     |
| 2             | TwoBitSeq | (round(clip(q, -c, c) * 2 - 0.5) + 0.5) / 2 (SEQ) | +-1/4, +-3/4 |
| 3, 4, 5, 6, 8 | Lsq       | clip(round(q), Qn, Qp), Qn = -2^(b-1), Qp = 2^(b-1) - 1 | integers |

A Quantizer holds everything that depends on the family: its levels, the range where the
straight-through gradient passes, the scale gradient's residual and normaliser, the scale at
the FP -> QAT switch, and the integer codes and their packing.

Shape key: I input dim, O output dim, K groups, G group size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qat_jax.errors import ConfigError

SCALE_FLOOR = 1e-5  # alpha is floored here, forward and backward (ParetoQ)
SEQ_CLIP = 0.99  # c: SEQ clips q to [-c, c] before rounding
GRANULARITIES = ("channel", "tensor", "group")


def _mean_to(x, shape):
    return _sum_to(x, shape) / (x.size // math.prod(shape))


def _max_to(x, shape):
    return jnp.max(x, axis=_broadcast_axes(x.shape, shape), keepdims=True)


def _broadcast_axes(x_shape, shape) -> tuple[int, ...]:
    """The axes along which a tensor of `shape` (same rank) broadcasts against x_shape."""
    return tuple(i for i, (a, b) in enumerate(zip(x_shape, shape, strict=True))
                 if b == 1 and a != 1)


def _sum_to(x, shape):
    """Sum x over the axes alpha broadcasts along: the per-channel (group) reduction."""
    return jnp.sum(x, axis=_broadcast_axes(x.shape, shape), keepdims=True)


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """One bit width's quantizer. q = W / alpha throughout; `levels(q)` is W_q / alpha."""

    bits: float
    n_codes: int  # distinct levels
    packed_bits: float  # storage bits per weight
    block_scale: float = 1.0  # the multiple of alpha a llama.cpp block stores as its fp16 scale

    def levels(self, q):
        raise NotImplementedError

    def inside(self, q):
        """Where q lies inside the range: the straight-through gradient passes there."""
        raise NotImplementedError

    def residual(self, w, q):
        """e of the scale gradient, dalpha = sum over the channel of g * e * grad_norm."""
        raise NotImplementedError

    def grad_norm(self, n: int) -> float:
        """The scale gradient's normaliser for a matrix of n weights: 1 / sqrt(n)."""
        return 1.0 / math.sqrt(n)

    def init_scale(self, abs_w, shape):
        """alpha at the switch from |W| (viewed against alpha's `shape`)."""
        raise NotImplementedError

    def codes(self, lev: np.ndarray) -> np.ndarray:
        """Integer codes 0 .. n_codes - 1 of levels (int64)."""
        raise NotImplementedError

    def from_codes(self, c: np.ndarray) -> np.ndarray:
        """The levels of float32 codes."""
        raise NotImplementedError

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """Codes (any shape, flattened in C order) packed densely into uint8: b bits each,
        little-endian within the stream."""
        flat = np.asarray(codes).reshape(-1).astype(np.int64)
        b = int(self.bits)
        bit_matrix = (flat[:, None] >> np.arange(b)) & 1
        return np.packbits(bit_matrix.reshape(-1).astype(np.uint8), bitorder="little")

    def unpack(self, packed: np.ndarray, count: int) -> np.ndarray:
        """Inverse of `pack`: the first `count` codes."""
        packed = np.asarray(packed, np.uint8)
        b = int(self.bits)
        stream = np.unpackbits(packed, bitorder="little")[:count * b].reshape(count, b)
        return (stream.astype(np.int64) << np.arange(b)).sum(axis=1).astype(
            np.uint8 if b <= 8 else np.uint16)


@dataclasses.dataclass(frozen=True)
class Sign(Quantizer):
    """1 bit: sign(q), levels +-1; alpha starts at mean |W|; e = sign(W), unmasked."""

    bits: float = 1
    n_codes: int = 2
    packed_bits: float = 1.0

    def levels(self, q):
        return jnp.sign(q)

    def inside(self, q):
        return jnp.abs(q) <= 1.0

    def residual(self, w, q):
        return jnp.sign(w)

    def init_scale(self, abs_w, shape):
        return _mean_to(abs_w, shape)

    def codes(self, lev):
        return (lev >= 0).astype(np.int64)  # sign(0) is coded as +1

    def from_codes(self, c):
        return 2.0 * c - 1.0


@dataclasses.dataclass(frozen=True)
class Seq(Quantizer):
    """Stretched elastic quantization (ParetoQ), 1.58 and 2 bits: q clipped to [-c, c], then
    rounded to `n_codes` levels; alpha starts at max |W|. Outside [-c, c] the scale
    gradient's residual is +-`outer`."""

    outer: float = 1.0  # Qp' of SEQ's scale gradient outside [-c, c]

    def inside(self, q):
        return jnp.abs(q) <= SEQ_CLIP

    def residual(self, w, q):
        return jnp.where(q < -SEQ_CLIP, -self.outer,
                         jnp.where(q > SEQ_CLIP, self.outer, self.levels(q) - q))

    def init_scale(self, abs_w, shape):
        return _max_to(abs_w, shape)


@dataclasses.dataclass(frozen=True)
class Ternary(Seq):
    """1.58 bits: levels 0, +-2/3, packed as base-3 digits, 5 per byte (1.6 bits). `outer` is
    1.0 as in ParetoQ's code, not the top level 2/3 (kept so runs compare with theirs)."""

    bits: float = 1.58
    n_codes: int = 3
    packed_bits: float = 1.6
    block_scale: float = 2 / 3  # llama.cpp's TQ2_0: d = 2 alpha / 3, the level's unit
    outer: float = 1.0

    def levels(self, q):
        return jnp.round(jnp.clip(q, -SEQ_CLIP, SEQ_CLIP) * 1.5) / 1.5

    def codes(self, lev):
        return np.rint(lev * 1.5).astype(np.int64) + 1

    def from_codes(self, c):
        return (c - 1.0) / 1.5

    def pack(self, codes):
        flat = np.asarray(codes).reshape(-1).astype(np.int64)
        flat = np.concatenate([flat, np.zeros((-len(flat)) % 5, np.int64)]).reshape(-1, 5)
        return (flat @ (3 ** np.arange(5))).astype(np.uint8)

    def unpack(self, packed, count):
        digits = (np.asarray(packed, np.uint8).astype(np.int64)[:, None]
                  // (3 ** np.arange(5))) % 3
        return digits.reshape(-1)[:count].astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class TwoBitSeq(Seq):
    """2 bits: levels +-1/4, +-3/4; `outer` 0.75."""

    bits: float = 2
    n_codes: int = 4
    packed_bits: float = 2.0
    outer: float = 0.75

    def levels(self, q):
        return (jnp.round(jnp.clip(q, -SEQ_CLIP, SEQ_CLIP) * 2.0 - 0.5) + 0.5) / 2.0

    def codes(self, lev):
        return np.rint(lev * 2.0 + 1.5).astype(np.int64)

    def from_codes(self, c):
        return (c - 1.5) / 2.0


@dataclasses.dataclass(frozen=True)
class Lsq(Quantizer):
    """3 to 8 bits (LSQ): integers clip(round(q), Qn, Qp); alpha starts at max |W| / Qp; the
    scale gradient is normalised by 1 / sqrt(n Qp)."""

    @property
    def qn(self) -> int:
        return -(2 ** (int(self.bits) - 1))

    @property
    def qp(self) -> int:
        return 2 ** (int(self.bits) - 1) - 1

    def levels(self, q):
        return jnp.clip(jnp.round(q), self.qn, self.qp)

    def inside(self, q):
        return (q >= self.qn) & (q <= self.qp)

    def residual(self, w, q):
        return jnp.where(q < self.qn, self.qn, jnp.where(q > self.qp, self.qp, jnp.round(q) - q))

    def grad_norm(self, n):
        return 1.0 / math.sqrt(n * self.qp)

    def init_scale(self, abs_w, shape):
        return _max_to(abs_w, shape) / self.qp

    def codes(self, lev):
        return np.rint(lev).astype(np.int64) - self.qn

    def from_codes(self, c):
        return c + self.qn


QUANTIZERS = {1: Sign(), 1.58: Ternary(), 2: TwoBitSeq(),
              **{b: Lsq(b, 2 ** b, float(b)) for b in (3, 4, 5, 6, 8)}}
BITS = tuple(QUANTIZERS)


def check_bits(bits):
    """ConfigError naming the valid bit widths, for one without a quantizer."""
    if bits not in QUANTIZERS:
        raise ConfigError(f"quant.bits={bits!r} is not supported; valid: {list(BITS)} "
                          f"(None for full precision)")


def quantizer(bits) -> Quantizer:
    """The Quantizer of a bit width (ConfigError naming the valid ones otherwise)."""
    check_bits(bits)
    return QUANTIZERS[bits]


def embedding_bits(bits) -> float:
    """The tied embedding / head is quantized to max(B, 4) bits (as in the paper)."""
    return max(bits, 4)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """config.quant, typed: what the model and the parameter-tree helpers below read."""

    bits: float | None = None  # None: full precision
    granularity: str = "channel"
    group_size: int = 0
    quantize_embedding: bool = False
    scale_dtype: str = "float32"  # 'float16': the scales as llama.cpp stores them (stored_scale)

    @classmethod
    def from_config(cls, config) -> QuantConfig:
        q = config.quant
        return cls(q.bits, q.granularity, q.group_size, q.quantize_embedding, q.scale_dtype)

    @property
    def group(self) -> int:
        """G of per-group scales; 0 for per-channel and per-tensor ones."""
        return self.group_size if self.granularity == "group" else 0


SCALE_DTYPES = ("float32", "float16")


def stored_scale(alpha, scale_dtype: str, block_scale: float = 1.0):
    """The scale as the quantized model uses it. 'float16' rounds it in the forward pass so
    that `block_scale` alpha (what a llama.cpp block stores: Quantizer.block_scale) is the
    nearest fp16 number, with a straight-through backward (the gradient reaches the float32
    scale unchanged): QAT then trains on the grid llama.cpp serves. 'float32' is the scale."""
    if scale_dtype == "float32":
        return alpha
    k = jnp.asarray(block_scale, alpha.dtype)
    rounded = (alpha * k).astype(jnp.float16).astype(alpha.dtype) / k
    return alpha + jax.lax.stop_gradient(rounded - alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ste_fake_quant(w, alpha, qz: Quantizer):
    """alpha * level(w / alpha) with the straight-through backward below (w and alpha as
    `floored_view` gives them)."""
    return alpha * qz.levels(w / alpha)


def _fake_quant_fwd(w, alpha, qz):
    return ste_fake_quant(w, alpha, qz), (w, alpha)


def _fake_quant_bwd(qz, res, g):
    """The straight-through estimator (ParetoQ / LSQ):
    - dW passes the upstream gradient g where q lies inside the quantizer's range and is 0
      where q was clipped (sign: |q| <= 1; SEQ: |q| <= c; LSQ: Qn <= q <= Qp);
    - dalpha = sum over the channel (group) of g * e, scaled by 1/sqrt(n) (1/sqrt(n * Qp) for
      LSQ), with e the quantization residual level(q) - q inside the range and the clipped
      level outside it (sign: e = sign(W), unmasked)."""
    w, alpha = res
    q = w / alpha
    e = qz.residual(w, q)
    dw = jnp.where(qz.inside(q), g, 0.0).astype(w.dtype)
    dalpha = (_sum_to(g * e, alpha.shape) * qz.grad_norm(w.size)).astype(alpha.dtype)
    return dw, dalpha


ste_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def scale_shape(w_shape: tuple[int, int], granularity: str, group_size: int = 0):
    """Shape of alpha for a weight of shape (I, O)."""
    n_in, n_out = w_shape
    check_scales(granularity, group_size, {"I": n_in})  # the weight w_IO's input dimension
    return {"channel": (1, n_out), "tensor": (1, 1)}.get(granularity) or (
        n_in // group_size, 1, n_out)


def check_scales(granularity: str, group_size: int, dims: dict[str, int]):
    """ConfigError for a granularity not in GRANULARITIES, or per-group scales whose
    group_size does not divide every input dimension `dims` (name -> size)."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"quant.granularity={granularity!r}; valid: {GRANULARITIES}")
    for key, size in dims.items() if granularity == "group" else ():
        if group_size <= 0 or size % group_size:
            raise ConfigError(f"quant.group_size={group_size} must be positive and divide "
                              f"every input dimension ({key}={size})")


def _grouped(w_IO, group: int):
    """w_IO viewed against its scales: w_KGO for per-group scales (group = G > 0)."""
    return w_IO.reshape(w_IO.shape[0] // group, group, w_IO.shape[1]) if group else w_IO


def floored_view(w_IO, alpha, group: int):
    """(w viewed against alpha (`_grouped`); alpha floored at SCALE_FLOOR, ParetoQ's floor: a
    floored scale gets no gradient, as through torch.where)."""
    w = _grouped(w_IO, group)
    if w.ndim != alpha.ndim:
        raise ValueError(f"a scale of shape {alpha.shape} for a weight {w_IO.shape} with "
                         f"group size {group}: per-group scales are (I / G, 1, O)")
    return w, jnp.where(alpha > SCALE_FLOOR, alpha, SCALE_FLOOR).astype(w_IO.dtype)


def fake_quant(w_IO, alpha, qz: Quantizer, group: int = 0):
    """The fake-quantized weight (same shape and dtype as w_IO), differentiable in both w and
    alpha through the straight-through estimator. alpha has shape scale_shape(...); `group`
    is G of per-group scales, else 0."""
    w, alpha = floored_view(w_IO, alpha, group)
    return ste_fake_quant(w, alpha, qz).reshape(w_IO.shape)


def init_scale(w_IO, qz: Quantizer, granularity: str = "channel", group_size: int = 0):
    """alpha at the FP -> QAT switch (the quantizer's rule: mean |W| for sign, max |W| for
    SEQ, max |W| / Qp for LSQ) over each channel, group or the whole tensor."""
    shape = scale_shape(w_IO.shape, granularity, group_size)
    w = _grouped(w_IO, group_size if granularity == "group" else 0)
    return qz.init_scale(jnp.abs(w), shape).astype(jnp.float32)


# ----------------------------------------------------------------------------- integer codes


def to_codes(w_IO, alpha, qz: Quantizer, group: int = 0) -> np.ndarray:
    """Unsigned integer codes 0 .. n_codes-1 of the fake-quantized weight (sign(0) is coded as
    +1: the one point where the 1-bit export differs from sign(W) = 0)."""
    alpha = np.maximum(np.asarray(alpha, np.float32), SCALE_FLOOR)
    w = _grouped(np.asarray(w_IO, np.float32), group)
    codes = qz.codes(np.asarray(qz.levels(jnp.asarray(w / alpha))))
    return codes.reshape(np.shape(w_IO)).astype(np.uint8 if qz.n_codes <= 256 else np.uint16)


def from_codes(codes_IO, alpha, qz: Quantizer, group: int = 0, dtype=np.float32) -> np.ndarray:
    """The dequantized weight alpha * level(code)."""
    lev = _grouped(qz.from_codes(np.asarray(codes_IO).astype(np.float32)), group)
    alpha = np.maximum(np.asarray(alpha, np.float32), SCALE_FLOOR)
    return (alpha * lev).reshape(np.shape(codes_IO)).astype(dtype)
