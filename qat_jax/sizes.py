"""What a model counts, without building it (from its specs: `ModelSpec`, its architecture,
and quant.QuantConfig): its parameters, its bytes as served
(the one rule S, the plan, the law's tables and the exports share: docs/configs.md, "Model
bytes") and its training FLOPs per token."""

from __future__ import annotations

import dataclasses
import math

from qat_jax import quant


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A decoder's architecture (config.model's shape keys): what its counts read, and the
    shape part of model.ModelConfig (which adds how it executes)."""

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
    tie_embeddings: bool = True  # the head is the input embedding; False: a [V, D] of its own

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_config(cls, config) -> ModelSpec:
        m = config.model
        return cls(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff,
                   m.seq_len, m.rope_theta, m.norm_eps, m.init_std, m.tie_embeddings)


def specs(config) -> tuple[ModelSpec, quant.QuantConfig]:
    """The model and quantization specs of a config (what the counts below take)."""
    return ModelSpec.from_config(config), quant.QuantConfig.from_config(config)


def _block_kernels(m: ModelSpec) -> list[tuple[int, int]]:
    """(input, output) of a block's projections: q, k, v, o, gate, up, down."""
    D, E = m.d_model, m.head_dim
    return [(D, m.n_heads * E), (D, m.n_kv_heads * E), (D, m.n_kv_heads * E),
            (m.n_heads * E, D), (D, m.d_ff), (D, m.d_ff), (m.d_ff, D)]


def param_count(m: ModelSpec, q: quant.QuantConfig) -> dict[str, int]:
    """Parameters of the decoder `m` with scales as `q` shapes them: `total` (every leaf,
    quantizer scales included), `non_embedding` (total minus the V x D input embedding and its
    scales; an untied head counts here) and `scales`."""
    D = m.d_model
    kernels = _block_kernels(m)
    n_scales = lambda shape: math.prod(quant.scale_shape(shape, q.granularity, q.group_size))
    per_block = sum(i * o + n_scales((i, o)) for i, o in kernels) + 2 * D  # + 2 RMSNorm scales
    embed = m.vocab_size * D + n_scales((D, m.vocab_size))
    head = 0 if m.tie_embeddings else embed  # an untied head: a table and scales of its own
    non_embed = m.n_layers * per_block + D + head  # + the final norm
    scales = (m.n_layers * sum(n_scales(k) for k in kernels)
              + n_scales((D, m.vocab_size)) * (1 if m.tie_embeddings else 2))
    return {"total": embed + non_embed, "non_embedding": non_embed, "scales": scales}


def served_bytes(m: ModelSpec, q: quant.QuantConfig, bits=None) -> dict[str, int]:
    """The bytes of the model `m` (scales and embedding as `q` says) as it is served and as
    `qat-jax export` writes its tensors (the rule of docs/configs.md, "Model bytes"), for a
    B-bit QAT model or (bits None, or >= 16) the full-precision one:
    - `quantized`: each quantized matrix packed at the quantizer's packed_bits per weight
      (ternary 1.6), rounded up to a byte per matrix; the embedding (and an untied head) too,
      at max(B, 4) bits, when quant.quantize_embedding;
    - `scales`: their scales, float32 (one per channel or group);
    - `other`: every other tensor (norms; the embedding unless quantized) in bfloat16.
    Full precision: every parameter but the (unused) quantizer scales in bfloat16.
    S, the tokens per parameter byte of METHOD.md section 2, is tokens / `total`."""
    D = m.d_model
    kernels = _block_kernels(m) * m.n_layers
    tables = [(D, m.vocab_size)] * (1 if m.tie_embeddings else 2)  # the embedding, a head
    norms = (2 * m.n_layers + 1) * D
    if bits is None or bits >= 16:
        n = sum(i * o for i, o in kernels) + sum(math.prod(t) for t in tables) + norms
        return {"quantized": 0, "scales": 0, "other": 2 * n, "total": 2 * n}
    quantized = [(k, bits) for k in kernels]
    if q.quantize_embedding:
        quantized += [(t, quant.embedding_bits(bits)) for t in tables]
    else:
        norms += sum(math.prod(t) for t in tables)
    packed = sum(math.ceil(math.prod(k) * quant.quantizer(b).packed_bits / 8) for k, b in quantized)
    scales = 4 * sum(math.prod(quant.scale_shape(k, q.granularity, q.group_size))
                     for k, _ in quantized)
    return {"quantized": packed, "scales": scales, "other": 2 * norms,
            "total": packed + scales + 2 * norms}


def flops_per_token(m: ModelSpec) -> int:
    """Training FLOPs per token: 6 x (matmul parameters incl. the tied head) for the forward and
    backward matmuls, plus 6 x 2 x n_layers x seq_len x d_model for attention scores and values
    (no causal discount: the dense kernels compute the full L x L products)."""
    E = m.head_dim
    per_block = m.d_model * (2 * m.n_heads * E + 2 * m.n_kv_heads * E) + 3 * m.d_model * m.d_ff
    matmul_params = m.n_layers * per_block + m.vocab_size * m.d_model
    return 6 * matmul_params + 12 * m.n_layers * m.seq_len * m.d_model
