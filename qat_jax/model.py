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
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from qat_jax import attention, kernels, layout, quant, sizes
from qat_jax.errors import ConfigError
from qat_jax.rope import rope

DotGeneral = Callable[..., jax.Array]

# Logical axis names of every parameter and activation (sharding.py maps them to mesh axes).
BATCH, SEQ, EMBED, VOCAB, Q_HEADS, KV_HEADS, MLP, NORM, LAYERS = (
    "batch", "seq", "embed", "vocab", "q_heads", "kv_heads", "mlp", "norm", "layers"
)


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a model executes, as config.model asks: its 'auto' choices are resolved for the
    target platform by `ModelConfig.build`."""

    compute_dtype: str = "auto"  # 'auto', 'float32' or 'bfloat16'
    matmul_precision: str = "auto"  # a name of kernels.MATMUL_PRECISIONS
    remat_policy: str = "none"
    scan_layers: bool = False
    attention: str = "auto"  # a name of attention.IMPLEMENTATIONS
    attention_block: int = 512
    loss_chunk_len: int = 0
    cpu_kernels: bool = True  # float32 operands on CPU through kernels.py's forms too

    @classmethod
    def from_config(cls, config) -> Execution:
        m = config.model
        return cls(m.compute_dtype, m.matmul_precision, m.remat_policy, m.scan_layers,
                   m.attention, m.attention_block, m.loss_chunk_len, m.cpu_kernels)


@dataclasses.dataclass(frozen=True)
class ModelConfig(sizes.ModelSpec):
    """The model: its architecture (sizes.ModelSpec) and how it executes (below), read once
    from `config.model`."""

    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    # kernels.py's forms (projections, attention, cross-entropy) with operands of this dtype:
    # 'bfloat16' (float32 compute, bf16 operands) or 'float32'; '': XLA's own forms
    kernel_operands: str = ""
    remat_policy: str = "none"  # a name of REMAT_POLICIES
    scan_layers: bool = False  # the blocks under nn.scan: parameters stacked [n_layers, ...]
    attention: str = "xla"  # a resolved implementation of attention.py (not 'auto')
    attention_block: int = 512  # splash attention's block size (query and key/value)
    loss_chunk_len: int = 0  # sequence positions per cross-entropy chunk; 0: all at once
    platform: str = "cpu"  # the platform the model is compiled for ('cpu', 'gpu', 'tpu')
    dot_general: DotGeneral = lax.dot_general  # the projections' matmul (injectable)
    quant: quant.QuantConfig = quant.QuantConfig()  # bits=None: full precision

    @classmethod
    def build(cls, spec: sizes.ModelSpec, q: quant.QuantConfig, ex: Execution,
              platform: str | None = None, **overrides) -> ModelConfig:
        """The model `spec` with scales `q`, executing as `ex` asks on `platform` (default: this
        host's backend); the 'auto' choices (compute dtype, attention) follow the platform, not
        the host, so an ahead-of-time compile for TPU from a CPU host gets the TPU model."""
        platform = platform or jax.default_backend()
        dtype = compute_dtype(ex.compute_dtype, platform)
        operands = kernels.choose_operands(ex.matmul_precision, dtype, platform, ex.cpu_kernels)
        fields = dict(
            **{f.name: getattr(spec, f.name) for f in dataclasses.fields(sizes.ModelSpec)},
            dtype=dtype, kernel_operands=operands,
            remat_policy=ex.remat_policy, scan_layers=ex.scan_layers,
            attention=attention.resolve(ex.attention, platform, dtype),
            attention_block=ex.attention_block, loss_chunk_len=ex.loss_chunk_len,
            platform=platform, quant=q)
        fields.update(overrides)
        fields.setdefault("dot_general", kernels.DOTS.get(fields["kernel_operands"],
                                                          lax.dot_general))
        L = spec.seq_len
        if fields["attention"] == "splash" and L % min(ex.attention_block, L):
            raise ConfigError(f"splash attention: model.seq_len={L} is not a multiple of "
                             f"model.attention_block={ex.attention_block}")
        return cls(**fields)

    @property
    def bf16_matmuls(self) -> bool:
        """float32 compute with bfloat16 matmul operands (kernels.py)."""
        return self.kernel_operands == "bfloat16"

    @classmethod
    def from_config(cls, config, platform: str | None = None, **overrides) -> ModelConfig:
        """`build` from the specs of `config` (a tool's saved run config)."""
        return cls.build(*sizes.specs(config), Execution.from_config(config), platform,
                         **overrides)


def compute_dtype(name: str, platform: str):
    """'auto' is bfloat16 on accelerators and float32 on CPU (where bf16 matmuls are no faster)."""
    if name == "auto":
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


# Rematerialisation policies (`model.remat_policy`): what a block keeps for the backward pass;
# everything else is recomputed. `None`: no remat (every activation kept).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul output, scores included
    # the projections' outputs, not the batched L x L attention products (MaxText's 'minimal')
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # the attention and MLP sub-layer outputs (named in Block): recompute inside each
    "attn_mlp_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    # q, k, v too: the backward redoes the softmax and the MLP, not the projections
    "qkv_attn_mlp_out": jax.checkpoint_policies.save_only_these_names(
        "q", "k", "v", "attn_out", "mlp_out"),
}


def _init(cfg: ModelConfig, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def _scale(module: nn.Module, name: str, w_shape, out_axis: str, cfg: ModelConfig):
    """The quantizer scale of a weight (ones until `qparams.init_scales` sets it), sharded along
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
            qz = quant.quantizer(cfg.quant.bits)
            w_IO = quant.fake_quant(w_IO, quant.stored_scale(scale, cfg.quant.scale_dtype,
                                                             qz.block_scale), qz, cfg.quant.group)
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


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, positions_BL=None):
        cfg = self.cfg
        B, L, _ = x_BLD.shape
        H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = Dense(cfg, H * E, (EMBED, Q_HEADS), name="q")(x_BLD).reshape(B, L, H, E)
        k = Dense(cfg, K * E, (EMBED, KV_HEADS), name="k")(x_BLD).reshape(B, L, K, E)
        v = Dense(cfg, K * E, (EMBED, KV_HEADS), name="v")(x_BLD).reshape(B, L, K, E)
        if positions_BL is not None:
            out_BLHE = self._cached(q, k, v, positions_BL)
            return Dense(cfg, cfg.d_model, (Q_HEADS, EMBED), name="o")(
                out_BLHE.reshape(B, L, H * E))
        positions = np.arange(L)
        # The splash kernel's layout is heads first, [B, H, L, E]: transposed here, before
        # RoPE, the transpose fuses with the rotation instead of costing a pass of its own.
        heads_first = cfg.attention == "splash"
        if heads_first:
            q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
        seq_axis = 2 if heads_first else 1
        q = rope(q, positions, cfg.rope_theta, seq_axis)
        k = rope(k, positions, cfg.rope_theta, seq_axis)
        q, k, v = (checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v"))
        # Grouped-query attention natively (K divides H), by the configured implementation.
        if cfg.kernel_operands and cfg.attention == "xla":
            out = kernels.causal_attention(q, k, v, cfg.kernel_operands)
        else:
            out = attention.causal_attention(
                q, k, v, implementation=cfg.attention, block_size=cfg.attention_block,
                axes=(BATCH, Q_HEADS, SEQ, None) if heads_first else (BATCH, SEQ, Q_HEADS, None),
                platform=cfg.platform)
        out_BLHE = jnp.swapaxes(out, 1, 2) if heads_first else out
        return Dense(cfg, cfg.d_model, (Q_HEADS, EMBED), name="o")(out_BLHE.reshape(B, L, H * E))

    def _cached(self, q_BLHE, k_BLKE, v_BLKE, positions_BL):
        """Attention with a key/value cache (the 'cache' collection): this call's keys and
        values are written at their rows' positions of a [B, seq_len, K, E] cache, and each
        query attends to the cache slots at or before its own position. A slot after the
        position may hold a padded prompt's filler until a later token overwrites it: it is
        never attended to."""
        cfg = self.cfg
        B = q_BLHE.shape[0]
        shape = (B, cfg.seq_len, cfg.n_kv_heads, cfg.head_dim)
        cache_k = self.variable("cache", "cached_k", jnp.zeros, shape, k_BLKE.dtype)
        cache_v = self.variable("cache", "cached_v", jnp.zeros, shape, v_BLKE.dtype)
        q_BLHE = rope(q_BLHE, positions_BL, cfg.rope_theta)
        rows = jnp.arange(B)[:, None]
        cache_k.value = cache_k.value.at[rows, positions_BL].set(
            rope(k_BLKE, positions_BL, cfg.rope_theta))
        cache_v.value = cache_v.value.at[rows, positions_BL].set(v_BLKE)
        visible_BLT = jnp.arange(cfg.seq_len)[None, None, :] <= positions_BL[:, :, None]
        return jax.nn.dot_product_attention(q_BLHE, cache_k.value, cache_v.value,
                                            mask=visible_BLT[:, None], implementation="xla")


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
    def __call__(self, x_BLD, positions_BL=None):
        attn_BLD = Attention(self.cfg, name="attn")(RMSNorm(self.cfg, name="attn_norm")(x_BLD),
                                                    positions_BL)
        x_BLD = x_BLD + checkpoint_name(attn_BLD, "attn_out")
        mlp_BLD = FeedForward(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BLD))
        x_BLD = x_BLD + checkpoint_name(mlp_BLD, "mlp_out")
        return nn.with_logical_constraint(x_BLD, (BATCH, SEQ, EMBED))


def _block(cfg: ModelConfig):
    """The Block class, rematerialised by cfg.remat_policy."""
    if cfg.remat_policy == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy])


class _ScanBody(nn.Module):
    """One step of the scan over layers: (x, None) -> (block(x), None)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, _):
        return _block(self.cfg)(self.cfg, name=layout.SCANNED_BLOCK)(x_BLD), None


class Decoder(nn.Module):
    """tokens_BL (int) -> logits_BLV (float32); with targets_BL, the mean next-token
    cross-entropy instead (in chunks of cfg.loss_chunk_len positions, so that the full
    [B, L, V] float32 logits never exist at once). With positions_BL (each row's positions of
    its tokens), the logits through a key/value cache (Attention._cached; the 'cache'
    collection, mutable): the prompt once, then a token at a time (generate.py)."""

    cfg: ModelConfig

    def _head(self):
        """An untied head's table [V, D] (model.tie_embeddings=False), quantized as the tied
        one is."""
        head_VD = self.param("head", _init(self.cfg, (VOCAB, EMBED)),
                             (self.cfg.vocab_size, self.cfg.d_model), jnp.float32)
        head_VD = _quantized_table(self, head_VD, "head_quant_scale", self.cfg)
        return nn.with_logical_constraint(head_VD, (VOCAB, None))

    @nn.compact
    def __call__(self, tokens_BL, targets_BL=None, positions_BL=None):
        cfg = self.cfg
        if positions_BL is not None and cfg.scan_layers:
            raise ValueError("cached decoding runs the loop layout: unstack a scanned model's "
                             "parameters (layout.unstack_layers) and set scan_layers=False")
        embed_VD = self.param("embed", _init(cfg, (VOCAB, EMBED)), (cfg.vocab_size, cfg.d_model),
                              jnp.float32)
        embed_VD = _quantized_table(self, embed_VD, "embed_quant_scale", cfg)
        # FSDP: gather the table's d_model shards before use (as for every weight); without
        # this the lookup's output would need the fsdp axis for both batch and d_model.
        embed_VD = nn.with_logical_constraint(embed_VD, (VOCAB, None))
        x_BLD = jnp.take(embed_VD, tokens_BL, axis=0).astype(cfg.dtype)
        x_BLD = nn.with_logical_constraint(x_BLD, (BATCH, SEQ, EMBED))
        if cfg.scan_layers:
            # One block traced once and run n_layers times: compile time flat in depth. Its
            # parameters are stacked on a leading "layers" axis (layout.SCANNED).
            layers = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: LAYERS})
            x_BLD, _ = layers(cfg, name=layout.SCANNED)(x_BLD, None)
        else:
            block = _block(cfg)
            for i in range(cfg.n_layers):
                x_BLD = block(cfg, name=f"block_{i}")(x_BLD, positions_BL)
        x_BLD = RMSNorm(cfg, name="final_norm")(x_BLD)
        head_VD = (embed_VD if cfg.tie_embeddings else self._head()).astype(cfg.dtype)
        if targets_BL is None:
            return _logits(x_BLD, head_VD)
        if cfg.kernel_operands:
            return kernels.cross_entropy(x_BLD, head_VD, targets_BL, cfg.loss_chunk_len,
                                         cfg.kernel_operands)
        return cross_entropy(x_BLD, head_VD, targets_BL, cfg.loss_chunk_len)


def _quantized_table(module, table_VD, scale_name: str, cfg: ModelConfig):
    """A [V, D] table (the embedding, or an untied head) as the head's matrix x @ table^T sees
    it: fake-quantized at max(B, 4) bits with quant.quantize_embedding; its output channels are
    the vocabulary rows."""
    scale = _scale(module, scale_name, (cfg.d_model, cfg.vocab_size), VOCAB, cfg)
    if cfg.quant.bits is None or not cfg.quant.quantize_embedding:
        return table_VD
    qz = quant.quantizer(quant.embedding_bits(cfg.quant.bits))
    return quant.fake_quant(table_VD.T, quant.stored_scale(scale, cfg.quant.scale_dtype,
                                                           qz.block_scale), qz, cfg.quant.group).T


def _logits(x_BLD, head_VD):
    """Tied output head: logits against the input embedding, accumulated in float32."""
    logits_BLV = jnp.einsum("bld,vd->blv", x_BLD, head_VD, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BLV, (BATCH, SEQ, VOCAB))


def cross_entropy(x_BLD, head_VD, targets_BL, chunk_len: int):
    """Mean next-token cross-entropy (nats) of the head's logits. With 0 < chunk_len < L, the
    positions are taken chunk_len at a time in a scan whose body is rematerialised: the forward
    keeps one chunk's [B, chunk_len, V] float32 logits, the backward recomputes them chunk by
    chunk, and the full logits never exist (at the paper's V = 32k they are the largest
    activation of the step)."""
    B, L, D = x_BLD.shape
    if not 0 < chunk_len < L:
        logits_BLV = _logits(x_BLD, head_VD)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL).mean()
    n = L // chunk_len  # resolve.resolve: chunk_len divides seq_len
    x_NBCD, t_NBC = kernels.position_chunks(x_BLD, n), kernels.position_chunks(targets_BL, n)

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def chunk(total, xt):
        x_BCD, t_BC = xt
        loss_BC = optax.softmax_cross_entropy_with_integer_labels(_logits(x_BCD, head_VD), t_BC)
        return total + loss_BC.sum(), None

    total, _ = lax.scan(chunk, jnp.zeros((), jnp.float32), (x_NBCD, t_NBC))
    return total / (B * L)
