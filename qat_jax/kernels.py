"""The CPU forms of a float32 model's matmuls (model.kernel_operands): matmuls with bfloat16
operands (`model.matmul_precision='bfloat16'`) or float32 ones, float32 products, and a
flash-style causal attention and a chunked cross-entropy built on them. With float32 operands
the same forms only reorder float32 sums; they run the tiny model's step 1.14x to 1.25x faster
than XLA's own forms (docs/performance.md).

Activations, weights, norms, softmaxes and the optimizer stay float32; only the operands of
the matmuls are rounded to bfloat16, and the products accumulate and come out in float32 (what
TPUs do for a float32 matmul at default precision). The two matmuls whose products feed a
softmax, the attention scores and the head's logits, keep float32 operands: their error would
grow with their size (rounding them too cost the tiny config 0.036 nats of validation loss). A
fake-quantized weight (quant.py) is rounded like any operand: its grid value moves by at most
2^-9 of itself.

On a CPU with bfloat16 dot instructions (avx512_bf16, amx_bf16, Arm's bf16) XLA's YNNPACK
kernels run such a matmul at about twice the float32 rate, but only in one form: operands
[batch, M, K] x [batch, K, N] laid out row-major. Any other form makes XLA convert the operands
back to float32 first (no gain) or, where that conversion is skipped, fail at run time. So every
matmul here, forward and backward, goes through `_canonical`, which transposes operands (and
the product) into that form with copies XLA keeps (`_copy_transpose`); tests/test_kernels.py
checks the compiled step's dots.

- `einsum`: a two-operand einsum whose backward is two more such einsums, in bfloat16.
- `dot_general`: the same with lax.dot_general's signature (the model's projections).
- `causal_attention`: softmax(q k^T / sqrt(E) + causal mask) v with grouped-query heads; its
  backward recomputes the probabilities from the saved log-sum-exp (as flash attention does),
  so that the L x L matrices go through memory fewer times.
- `cross_entropy`: the tied head and the mean next-token cross-entropy, whose gradients are
  computed in the forward pass, a chunk of positions at a time: the [B, L, V] logits never
  exist whole and each chunk's logits are used while they are in cache.

Shape key as in model.py: B batch, L sequence (M: key positions), D d_model, H query heads,
K key/value heads, G = H / K, E head dim, V vocabulary.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BF16 = jnp.bfloat16
_MASKED = -1e30  # a masked score: exp() of it minus any row maximum is 0


@functools.cache
def cpu_has_bf16_dot() -> bool:
    """Whether this host's CPU has bfloat16 dot-product instructions (x86 avx512_bf16 or
    amx_bf16, Arm bf16), read from /proc/cpuinfo; False where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


MATMUL_PRECISIONS = ("auto", "float32", "bfloat16")


def auto_matmul_precision(platform: str) -> str:
    """What `model.matmul_precision='auto'` is on `platform`: 'bfloat16' on a CPU with bfloat16
    dot instructions (cpu_has_bf16_dot; there five seeds of the tiny config end 0.0008
    nats from float32 on average, inside float32's own seed spread: docs/performance.md),
    'float32' elsewhere. A run records the value it was started with (rundir.pin_auto)."""
    return "bfloat16" if platform == "cpu" and cpu_has_bf16_dot() else "float32"


def matmul_bf16(name: str, dtype, platform: str = "cpu") -> bool:
    """Whether `model.matmul_precision=name` rounds the matmul operands of a float32 model to
    bfloat16 (about 1.5x faster than float32 on a CPU with bfloat16 dot instructions). A bfloat16
    model's matmuls are bfloat16 already. (resolve.py checks the name.)"""
    if name == "auto":
        name = auto_matmul_precision(platform)
    return name == "bfloat16" and jnp.dtype(dtype) == jnp.float32


def choose_operands(precision: str, dtype, platform: str, cpu_kernels: bool = True) -> str:
    """model.ModelConfig.kernel_operands: these forms with bfloat16 operands where `precision`
    asks for them (matmul_bf16); with float32 operands on CPU with float32 compute unless
    `cpu_kernels` is False (1.14x to 1.25x XLA's own forms' speed at the tiny model's shapes:
    docs/performance.md); elsewhere '' (XLA's own forms, and the platform's attention)."""
    if matmul_bf16(precision, dtype, platform):
        return "bfloat16"
    f32_cpu = platform == "cpu" and jnp.dtype(dtype) == jnp.float32
    return "float32" if cpu_kernels and f32_cpu else ""


def _parse(spec: str) -> tuple[str, str, str]:
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    return a, b, out


def _dims(a: str, b: str, out: str):
    """(batch, m, k, n) letters of a x b -> out: batch in all three, m in a and out, n in b
    and out, k contracted."""
    batch = [c for c in out if c in a and c in b]
    m = [c for c in out if c in a and c not in b]
    n = [c for c in out if c in b and c not in a]
    k = [c for c in a if c in b and c not in out]
    return batch, m, k, n


def _perm(src, dst) -> tuple[int, ...]:
    return tuple(src.index(c) for c in dst)


def _moved(src, dst) -> bool:
    return _perm(src, dst) != tuple(range(len(src)))


def _transposed_elements(a: str, b: str, out: str, size: dict) -> int:
    """Elements copied to bring a x b -> out into the canonical form (the float32 product
    counted twice: it is twice as wide)."""
    batch, m, k, n = _dims(a, b, out)
    count = lambda s: math.prod(size[c] for c in s)
    return (count(a) * _moved(a, batch + m + k) + count(b) * _moved(b, batch + k + n)
            + 2 * count(out) * _moved(batch + m + n, out))


def _copy_transpose(x, perm):
    """jnp.transpose(x, perm) as a copy in row-major layout. A plain transpose feeding a dot
    is folded into the dot's dimension numbers or given a column-major layout, the forms
    YNNPACK rejects; taken through a leading unit axis it stays a copy."""
    return jnp.transpose(x[None], (0, *(i + 1 for i in perm)))[0]


def _canonical(spec: str, a, b):
    """einsum(spec, a, b) for a and b of one dtype (bfloat16; float32 where a product feeds a
    softmax) as one float32-product dot_general in the [batch, M, K] x [batch, K, N] form,
    the operand order chosen to copy the fewest elements. Every letter of an operand must
    appear in the other operand or the output."""
    sa, sb, out = _parse(spec)
    size = {**dict(zip(sa, a.shape, strict=True)), **dict(zip(sb, b.shape, strict=True))}
    if _transposed_elements(sb, sa, out, size) < _transposed_elements(sa, sb, out, size):
        sa, sb, a, b = sb, sa, b, a
    batch, m, k, n = _dims(sa, sb, out)
    shape = lambda s: [size[c] for c in s]

    def arrange(x, src, dst, rows, cols):
        x = _copy_transpose(x, _perm(src, dst)) if _moved(src, dst) else x
        return x.reshape(shape(batch) + [math.prod(shape(rows)), math.prod(shape(cols))])

    nb = len(batch)
    y = lax.dot_general(arrange(a, sa, batch + m + k, m, k), arrange(b, sb, batch + k + n, k, n),
                        (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))),
                        preferred_element_type=jnp.float32).reshape(shape(batch + m + n))
    return _copy_transpose(y, _perm(batch + m + n, out)) if _moved(batch + m + n, out) else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum(dt, spec: str, a, b):
    return _canonical(spec, a.astype(dt), b.astype(dt))


def _einsum_fwd(dt, spec, a, b):
    a_, b_ = a.astype(dt), b.astype(dt)
    # zero-size witnesses of the inputs' dtypes (residuals must be arrays)
    return _canonical(spec, a_, b_), (a_, b_, jnp.zeros(0, a.dtype), jnp.zeros(0, b.dtype))


def _einsum_bwd(dt, spec, res, g):
    a_, b_, a_dtype, b_dtype = res
    sa, sb, out = _parse(spec)
    g_ = g.astype(dt)
    return (_canonical(f"{out},{sb}->{sa}", g_, b_).astype(a_dtype.dtype),
            _canonical(f"{sa},{out}->{sb}", a_, g_).astype(b_dtype.dtype))


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, a, b, operands=BF16):
    """jnp.einsum(spec, a, b) with operands rounded to `operands` (bfloat16; or float32, the
    same forms without rounding) and a float32 result; the gradients are computed the same way
    and returned in a's and b's dtypes."""
    return _einsum(jnp.dtype(operands), spec, a, b)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                operands=BF16):
    """lax.dot_general's signature over `einsum` (float32 result; `precision` and
    `preferred_element_type` are ignored): the model's injectable projection matmul, with
    `operands` as einsum's."""
    del precision, preferred_element_type
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter(_LETTERS)
    sa = [next(letters) for _ in range(lhs.ndim)]
    sb = [next(letters) for _ in range(rhs.ndim)]
    for i, j in zip((*lc, *lb), (*rc, *rb), strict=True):
        sb[j] = sa[i]
    batch = [sa[i] for i in lb]
    free_a = [c for i, c in enumerate(sa) if i not in (*lc, *lb)]
    free_b = [c for j, c in enumerate(sb) if j not in (*rc, *rb)]
    spec = f"{''.join(sa)},{''.join(sb)}->{''.join(batch + free_a + free_b)}"
    return einsum(spec, lhs, rhs, operands)


def dot_general_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`dot_general` with float32 operands (the float32 CPU path)."""
    return dot_general(lhs, rhs, dimension_numbers, operands=jnp.float32)


def _grouped(q_BLHE, n_kv_heads: int):
    B, L, H, E = q_BLHE.shape
    return q_BLHE.reshape(B, L, n_kv_heads, H // n_kv_heads, E)


def _masked_scores(q_BLKGE, k_BMKE):
    """The causal scores, from float32 operands: a score's error from bfloat16 operands grows
    with its size (about |s| / 256), and softmax turns it into a factor on the probability."""
    s_BKGLM = _canonical("blkge,bmke->bkglm", q_BLKGE, k_BMKE)
    L = s_BKGLM.shape[-1]
    causal = lax.broadcasted_iota(jnp.int32, (L, L), 0) >= lax.broadcasted_iota(
        jnp.int32, (L, L), 1)
    return jnp.where(causal, s_BKGLM, _MASKED)


def causal_attention(q_BLHE, k_BLKE, v_BLKE, operands=BF16):
    """softmax(q k^T / sqrt(E) + causal mask) v with K dividing H (grouped-query attention):
    float32 q, k, v in, float32 [B, L, H, E] out. The scores are float32 products; the
    probabilities times v and the backward's four matmuls take `operands` (bfloat16, or
    float32 on the float32 path)."""
    return _attention(jnp.dtype(operands), q_BLHE, k_BLKE, v_BLKE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(dt, q_BLHE, k_BLKE, v_BLKE):
    return _attention_fwd(dt, q_BLHE, k_BLKE, v_BLKE)[0]


def _attention_fwd(dt, q_BLHE, k_BLKE, v_BLKE):
    E, K = q_BLHE.shape[-1], k_BLKE.shape[2]
    q = _grouped(q_BLHE * (1.0 / math.sqrt(E)), K)
    s = _masked_scores(q, k_BLKE)
    row_max = s.max(-1, keepdims=True)
    p = jnp.exp(s - row_max)
    total = p.sum(-1, keepdims=True)
    v_ = v_BLKE.astype(dt)
    o_BLKGE = _canonical("bkglm,bmke->blkge", (p / total).astype(dt), v_)
    o = o_BLKGE.reshape(q_BLHE.shape)
    return o, (q, k_BLKE, v_, o, row_max + jnp.log(total))


def _attention_bwd(dt, res, g_BLHE):
    q, k, v_, o_BLHE, lse_BKGL1 = res
    K, E = k.shape[2], k.shape[-1]
    p = jnp.exp(_masked_scores(q, k) - lse_BKGL1)  # the forward's probabilities
    g = _grouped(g_BLHE, K)
    g_ = g.astype(dt)
    dp = _canonical("blkge,bmke->bkglm", g_, v_)
    # d softmax: p * (dp - rowsum(p * dp)), where rowsum(p * dp) = rowsum(g * o)
    delta_BLKG = jnp.einsum("blkge,blkge->blkg", g, _grouped(o_BLHE, K))
    ds_ = (p * (dp - jnp.transpose(delta_BLKG, (0, 2, 3, 1))[..., None])).astype(dt)
    dq = _canonical("bkglm,bmke->blkge", ds_, k.astype(dt)) * (1.0 / math.sqrt(E))
    dk = _canonical("bkglm,blkge->bmke", ds_, q.astype(dt))
    dv = _canonical("bkglm,blkge->bmke", p.astype(dt), g_)
    return dq.reshape(g_BLHE.shape), dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def position_chunks(x_BL_, n: int):
    """[B, L, ...] -> [n, B, L / n, ...]: chunks of positions, batch (and its sharding) kept."""
    B, L = x_BL_.shape[:2]
    return x_BL_.reshape(B, n, L // n, *x_BL_.shape[2:]).swapaxes(0, 1)


def _unchunk(x_NBC_):
    n, B, C = x_NBC_.shape[:3]
    return x_NBC_.swapaxes(0, 1).reshape(B, n * C, *x_NBC_.shape[3:])


def _chunk_count(L: int, chunk_len: int) -> int:
    return L // chunk_len if 0 < chunk_len < L else 1


def _chunk_loss(x_BCD, head_VD, t_BC):
    """(summed cross-entropy, softmax) of one chunk of positions. The logits are float32
    products (as the attention scores: their error would grow with their size)."""
    logits = _canonical("bcd,vd->bcv", x_BCD, head_VD)
    row_max = logits.max(-1, keepdims=True)
    e = jnp.exp(logits - row_max)
    total = e.sum(-1, keepdims=True)
    picked = jnp.take_along_axis(logits, t_BC[..., None], axis=-1)
    return (row_max + jnp.log(total) - picked).sum(), e / total


def cross_entropy(x_BLD, head_VD, targets_BL, chunk_len: int, operands=BF16):
    """Mean next-token cross-entropy (nats) of the tied head's logits x @ head^T,
    `chunk_len` positions at a time (0: all at once): the value of model.cross_entropy. The
    gradients' two matmuls take `operands` (bfloat16, or float32 on the float32 path)."""
    return _cross_entropy(jnp.dtype(operands), chunk_len, x_BLD, head_VD, targets_BL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cross_entropy(dt, chunk_len, x_BLD, head_VD, targets_BL):
    B, L, _ = x_BLD.shape
    n = _chunk_count(L, chunk_len)

    def chunk(total, xt):
        return total + _chunk_loss(xt[0], head_VD, xt[1])[0], None

    total, _ = lax.scan(chunk, jnp.zeros((), jnp.float32),
                        (position_chunks(x_BLD, n), position_chunks(targets_BL, n)))
    return total / (B * L)


def _cross_entropy_fwd(dt, chunk_len, x_BLD, head_VD, targets_BL):
    """The loss and, already, its gradients (for a cotangent of 1), chunk by chunk."""
    B, L, _ = x_BLD.shape
    n = _chunk_count(L, chunk_len)
    head_ = head_VD.astype(dt)

    def chunk(carry, xt):
        total, d_head = carry
        x, t = xt
        loss, probs = _chunk_loss(x, head_VD, t)
        d_ = (probs - jax.nn.one_hot(t, probs.shape[-1], dtype=probs.dtype)).astype(dt)
        dx = _canonical("bcv,vd->bcd", d_, head_)
        d_head = d_head + _canonical("bcv,bcd->vd", d_, x.astype(dt))
        return (total + loss, d_head), dx

    (total, d_head), dx = lax.scan(
        chunk, (jnp.zeros((), jnp.float32), jnp.zeros(head_VD.shape, jnp.float32)),
        (position_chunks(x_BLD, n), position_chunks(targets_BL, n)))
    scale = 1.0 / (B * L)
    grads = ((_unchunk(dx) * scale).astype(x_BLD.dtype), (d_head * scale).astype(head_VD.dtype),
             np.zeros(targets_BL.shape, jax.dtypes.float0))
    return total * scale, grads


def _cross_entropy_bwd(dt, chunk_len, grads, g):
    d_x, d_head, d_targets = grads
    return d_x * g, d_head * g, d_targets


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


# the projections' matmul for model.ModelConfig.kernel_operands
DOTS = {"bfloat16": dot_general, "float32": dot_general_f32}
