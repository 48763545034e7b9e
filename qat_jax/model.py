"""The Llama-2-style decoder (Flax Linen), its parameter count and its FLOPs per token.

RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP, no biases, causal (grouped-query)
attention, input embedding tied to the output head. Parameters are float32 and carry logical
axis names (mapped to mesh axes in sharding.py); the compute dtype is configurable.

Every projection (q, k, v, o, gate, up, down) is a `Dense`: the one place where weight
quantization enters. Each Dense owns a `quant_scale` parameter from step 0 in every config, so
FP and QAT parameter trees are identical; with `quant.bits=None` the scale is unused and the
model is exactly the full-precision one. The matmul itself is `ModelConfig.dot_general`.

Shape key: B batch, L sequence, D d_model, H query heads, K key/value heads, E head dim,
F d_ff, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from qat_jax import quant

DotGeneral = Callable[..., jax.Array]

# Logical axis names of every parameter and activation (sharding.py maps them to mesh axes).
BATCH, SEQ, EMBED, VOCAB, Q_HEADS, KV_HEADS, MLP, NORM = (
    "batch", "seq", "embed", "vocab", "q_heads", "kv_heads", "mlp", "norm"
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's hyper-parameters, read once from `config.model`."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    remat: bool = False
    dot_general: DotGeneral = lax.dot_general  # the projections' matmul (injectable)
    quant: quant.QuantConfig = quant.QuantConfig()  # bits=None: full precision

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_config(cls, config, **overrides) -> ModelConfig:
        m = config.model
        fields = dict(
            vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads, d_ff=m.d_ff, seq_len=m.seq_len, rope_theta=m.rope_theta,
            norm_eps=m.norm_eps, init_std=m.init_std, dtype=compute_dtype(m.compute_dtype),
            remat=m.remat, quant=quant.QuantConfig.from_config(config),
        )
        fields.update(overrides)
        return cls(**fields)


def compute_dtype(name: str):
    """'auto' is bfloat16 on accelerators and float32 on CPU (where bf16 matmuls are no faster)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _init(cfg: ModelConfig, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def _scale(module: nn.Module, name: str, w_shape, out_axis: str, cfg: ModelConfig):
    """The quantizer scale of a weight (ones until `quant.init_scales` sets it), sharded along
    its weight's output axis."""
    shape = quant.scale_shape(w_shape, cfg.quant.granularity, cfg.quant.group_size)
    axes = (None,) * (len(shape) - 1) + (out_axis,)
    return module.param(name, nn.with_logical_partitioning(nn.initializers.ones, axes), shape,
                        jnp.float32)


class Dense(nn.Module):
    """A bias-free projection x_...I @ w_IO, with w fake-quantized when cfg.quant.bits is set
    (in float32, before the cast to the compute dtype)."""

    cfg: ModelConfig
    features: int
    axes: tuple[str, str]  # logical names of (input, output)

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        shape = (x.shape[-1], self.features)
        w_IO = self.param("kernel", _init(cfg, self.axes), shape, jnp.float32)
        scale = _scale(self, "quant_scale", shape, self.axes[1], cfg)
        if cfg.quant.bits is not None:
            w_IO = quant.fake_quant(w_IO, scale, cfg.quant.bits)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        return cfg.dot_general(x.astype(cfg.dtype), w_IO.astype(cfg.dtype), dims)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                             (x_BLD.shape[-1],), jnp.float32)
        x = x_BLD.astype(jnp.float32)  # normalise in f32 whatever the compute dtype
        x = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x * scale_D).astype(self.cfg.dtype)


def rope(x_BLHE, positions_L, theta: float):
    """Rotary embedding (Su et al. 2021), Llama's half-split layout: dimension i is paired with
    i + E/2 and the pair is rotated by angle position * theta^(-2i/E)."""
    half = x_BLHE.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x_BLHE.shape[-1])
    angle_LE = positions_L[:, None].astype(jnp.float32) * freq[None, :]
    sin, cos = jnp.sin(angle_LE)[None, :, None, :], jnp.cos(angle_LE)[None, :, None, :]
    x1, x2 = x_BLHE[..., :half].astype(jnp.float32), x_BLHE[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHE.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.cfg
        B, L, _ = x_BLD.shape
        H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = Dense(cfg, H * E, (EMBED, Q_HEADS), name="q")(x_BLD).reshape(B, L, H, E)
        k = Dense(cfg, K * E, (EMBED, KV_HEADS), name="k")(x_BLD).reshape(B, L, K, E)
        v = Dense(cfg, K * E, (EMBED, KV_HEADS), name="v")(x_BLD).reshape(B, L, K, E)
        positions = jnp.arange(L)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        # Grouped-query attention natively (K divides H); XLA on CPU, cuDNN where available.
        out_BLHE = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return Dense(cfg, cfg.d_model, (Q_HEADS, EMBED), name="o")(out_BLHE.reshape(B, L, H * E))


class FeedForward(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.cfg
        gate_BLF = Dense(cfg, cfg.d_ff, (EMBED, MLP), name="gate")(x_BLD)
        up_BLF = Dense(cfg, cfg.d_ff, (EMBED, MLP), name="up")(x_BLD)
        return Dense(cfg, cfg.d_model, (MLP, EMBED), name="down")(nn.silu(gate_BLF) * up_BLF)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        x_BLD = x_BLD + Attention(self.cfg, name="attn")(RMSNorm(self.cfg, name="attn_norm")(x_BLD))
        x_BLD = x_BLD + FeedForward(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BLD))
        return nn.with_logical_constraint(x_BLD, (BATCH, SEQ, EMBED))


class Decoder(nn.Module):
    """tokens_BL (int) -> logits_BLV (float32)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BL):
        cfg = self.cfg
        embed_VD = self.param("embed", _init(cfg, (VOCAB, EMBED)), (cfg.vocab_size, cfg.d_model),
                              jnp.float32)
        # The head computes x @ embed^T: its output channels are the vocabulary rows.
        embed_scale = _scale(self, "embed_quant_scale", (cfg.d_model, cfg.vocab_size), VOCAB,
                             cfg)
        if cfg.quant.bits is not None and cfg.quant.quantize_embedding:
            embed_VD = quant.fake_quant(embed_VD.T, embed_scale,
                                        quant.embedding_bits(cfg.quant.bits)).T
        # FSDP: gather the table's d_model shards before use (as for every weight); without
        # this the lookup's output would need the fsdp axis for both batch and d_model.
        embed_VD = nn.with_logical_constraint(embed_VD, (VOCAB, None))
        x_BLD = jnp.take(embed_VD, tokens_BL, axis=0).astype(cfg.dtype)
        x_BLD = nn.with_logical_constraint(x_BLD, (BATCH, SEQ, EMBED))
        block = nn.remat(Block) if cfg.remat else Block
        for i in range(cfg.n_layers):
            x_BLD = block(cfg, name=f"block_{i}")(x_BLD)
        x_BLD = RMSNorm(cfg, name="final_norm")(x_BLD)
        # Tied output head: logits against the input embedding, accumulated in float32.
        logits_BLV = jnp.einsum("bld,vd->blv", x_BLD, embed_VD.astype(cfg.dtype),
                                preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits_BLV, (BATCH, SEQ, VOCAB))


def _block_kernels(m) -> list[tuple[int, int]]:
    """(input, output) of a block's projections: q, k, v, o, gate, up, down."""
    D, E = m.d_model, m.d_model // m.n_heads
    return [(D, m.n_heads * E), (D, m.n_kv_heads * E), (D, m.n_kv_heads * E),
            (m.n_heads * E, D), (D, m.d_ff), (D, m.d_ff), (m.d_ff, D)]


def param_count(config) -> dict[str, int]:
    """Parameters of the decoder for `config`: `total` (every leaf, quantizer scales included),
    `non_embedding` (total minus the V x D embedding and its scales) and `scales`."""
    m, q = config.model, config.quant
    D = m.d_model
    kernels = _block_kernels(m)
    n_scales = lambda shape: math.prod(quant.scale_shape(shape, q.granularity, q.group_size))
    per_block = sum(i * o + n_scales((i, o)) for i, o in kernels) + 2 * D  # + 2 RMSNorm scales
    embed = m.vocab_size * D + n_scales((D, m.vocab_size))
    non_embed = m.n_layers * per_block + D  # + the final norm
    scales = m.n_layers * sum(n_scales(k) for k in kernels) + n_scales((D, m.vocab_size))
    return {"total": embed + non_embed, "non_embedding": non_embed, "scales": scales}


def served_bytes(config, bits=None) -> dict[str, int]:
    """The bytes of the model as it is served and as `qat-jax export` writes its tensors (the
    rule of README's "Model bytes"), for a B-bit QAT model or (bits None, or >= 16) the
    full-precision one:
    - `quantized`: each quantized matrix packed at quant.packed_bits(B) bits per weight
      (ternary 1.6), rounded up to a byte per matrix; the tied embedding too, at max(B, 4)
      bits, when quant.quantize_embedding;
    - `scales`: their scales, float32 (one per channel or group);
    - `other`: every other tensor (norms; the embedding unless quantized) in bfloat16.
    Full precision: every parameter but the (unused) quantizer scales in bfloat16.
    S, the tokens per parameter byte of METHOD.md section 2, is tokens / `total`."""
    m, q = config.model, config.quant
    D = m.d_model
    kernels = _block_kernels(m) * m.n_layers
    embed, norms = (D, m.vocab_size), (2 * m.n_layers + 1) * D
    if bits is None or bits >= 16:
        n = sum(i * o for i, o in kernels) + math.prod(embed) + norms
        return {"quantized": 0, "scales": 0, "other": 2 * n, "total": 2 * n}
    quantized = [(k, bits) for k in kernels]
    if q.quantize_embedding:
        quantized.append((embed, quant.embedding_bits(bits)))
    else:
        norms += math.prod(embed)
    packed = sum(math.ceil(math.prod(k) * quant.packed_bits(b) / 8) for k, b in quantized)
    scales = 4 * sum(math.prod(quant.scale_shape(k, q.granularity, q.group_size))
                     for k, _ in quantized)
    return {"quantized": packed, "scales": scales, "other": 2 * norms,
            "total": packed + scales + 2 * norms}


def flops_per_token(config) -> int:
    """Training FLOPs per token: 6 x (matmul parameters incl. the tied head) for the forward and
    backward matmuls, plus 6 x 2 x n_layers x seq_len x d_model for attention scores and values
    (no causal discount: the dense kernels compute the full L x L products)."""
    m = config.model
    E = m.d_model // m.n_heads
    per_block = m.d_model * (2 * m.n_heads * E + 2 * m.n_kv_heads * E) + 3 * m.d_model * m.d_ff
    matmul_params = m.n_layers * per_block + m.vocab_size * m.d_model
    return 6 * matmul_params + 12 * m.n_layers * m.seq_len * m.d_model
