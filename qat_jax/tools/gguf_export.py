"""`qat-jax export --format=gguf`: the served model as a llama.cpp GGUF file, every quantized
matrix in the llama.cpp block type its quantizer maps onto, code for code.

llama.cpp's block types store an fp16 scale d per block of 32 or 256 weights and integer codes
q (ggml's dequantization; K-quants have 16 sub-blocks with a scale each):
    8 bits  Q8_0   w = d q, q int8                 d = alpha, q = our level
    6 bits  Q6_K   w = d s_j (q - 32), q 0..63     d = alpha, s_j = 1, q = level + 32
    5 bits  Q5_0   w = d (q - 16), q 0..31         d = alpha, q = level + 16
    4 bits  Q4_0   w = d (q - 8), q 0..15          d = alpha, q = level + 8
    3 bits  Q3_K   w = d (s_j - 32) (q - 4)        d = alpha, s_j = 33, q = level + 4
    2 bits  Q2_K   w = d s_j q - dmin m_j, q 0..3  s_j = 2, m_j = 3, d = dmin = alpha / 4
                                                   (levels +-1/4, +-3/4 of alpha)
    1.58    TQ2_0  w = d (q - 1), q 0..2           d = 2 alpha / 3 (levels 0, +-2/3)
    1 bit   TQ2_0                                  d = alpha, q 0 and 2 (levels +-1)
so a block holds our served weight alpha * level with our codes; the only change is d rounded
to fp16. The export reports the largest weight change it makes (by gguf's own dequantization):
none where d is an fp16 number (quant.scale_dtype=float16 trains so; at 1.58 bits the
weights then differ by float32's rounding of 2/3 only). Rows are blocked along the input
features, so a per-output-channel scale is every block's d, a per-tensor one too, and
per-group scales map where the group is a multiple of the block (32, or 256). Rows must be a
multiple of the block.

Also in the file: the llama architecture's metadata, the run's sentencepiece tokenizer as
GGUF tokenizer metadata (llama.cpp tokenizes as we do: no BOS, the pieces and their scores),
the norms in F32, and an unquantized embedding or head in F16. q and k rows are permuted from
the Hugging Face RoPE layout (halves) to llama.cpp's (interleaved pairs). Written with `gguf`,
llama.cpp's own writer.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from qat_jax import layout, qparams, quant
from qat_jax.errors import ConfigError
from qat_jax.sizes import ModelSpec


class GGUFExportError(ConfigError):
    """A model (bit width, granularity, shape) that no llama.cpp type holds exactly."""


def _fp16(d: np.ndarray) -> np.ndarray:
    """[blocks] scales as the 2 bytes of their fp16 numbers, [blocks, 2]."""
    return d.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """[blocks, 2k] values 0..15 -> k bytes: byte j holds value j (low nibble) and j + k."""
    k = c.shape[1] // 2
    return c[:, :k] | (c[:, k:] << 4)


def _crumbs(c: np.ndarray) -> np.ndarray:
    """[blocks, 256] values 0..3 -> 64 bytes: byte (h, l) holds value h*128 + 32 k + l in its
    bits 2k, 2k + 1 (the K-quants' and TQ2_0's order)."""
    c = c.reshape(-1, 2, 4, 32)
    return (c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6).reshape(-1, 64)


def _q8_0(q, d):  # w = d * q, q int8 (here its two's complement byte)
    return np.concatenate([_fp16(d), q], axis=-1)


def _q5_0(q, d):  # w = d * (q - 16), q 0..31: fifth bits as a little-endian uint32
    high = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")
    return np.concatenate([_fp16(d), high, _nibbles(q & 0x0F)], axis=-1)


def _q4_0(q, d):  # w = d * (q - 8), q 0..15
    return np.concatenate([_fp16(d), _nibbles(q)], axis=-1)


def _q6_k(q, d):  # w = d * scale_j * (q - 32), q 0..63, 16 sub-blocks of 16 (scale_j = 1)
    halves = q.reshape(-1, 2, 128)  # low nibbles: byte (h, i) holds h*128 + i and + 64
    low = _nibbles(halves[:, 0] & 0x0F), _nibbles(halves[:, 1] & 0x0F)
    high = _crumbs(q >> 4)
    scales = np.ones((len(q), 16), np.int8).view(np.uint8)
    return np.concatenate([*low, high, scales, _fp16(d)], axis=-1)


def _q3_k(q, d):  # w = d * (scale_j - 32) * (q - 4), q 0..7 (scale_j = 33)
    hmask = np.packbits((q >> 2).reshape(-1, 8, 32).transpose(0, 2, 1), axis=-1,
                        bitorder="little").reshape(-1, 32)
    scales = np.full((len(q), 16), 33, np.uint8)  # 6 bits each, packed as ggml does
    low = scales[:, :8] & 0x0F | (scales[:, 8:] & 0x0F) << 4
    high = np.zeros((len(q), 4), np.uint8)
    for k in range(4):
        high |= (scales[:, 4 * k:4 * k + 4] >> 4) << (2 * k)
    return np.concatenate([hmask, _crumbs(q & 3), low, high, _fp16(d)], axis=-1)


def _q2_k(q, d):  # w = d * sc * q - dmin * m, q 0..3: sc = 2, m = 3, d = dmin = alpha / 4
    scales = np.full((len(q), 16), 2 | 3 << 4, np.uint8)
    return np.concatenate([scales, _crumbs(q), _fp16(d), _fp16(d)], axis=-1)


def _tq2_0(q, d):  # w = d * (q - 1), q 0..2
    return np.concatenate([_crumbs(q), _fp16(d)], axis=-1)


@dataclasses.dataclass(frozen=True)
class BlockType:
    """How one bit width's matrices are stored in llama.cpp: its type, weights per block, the
    block's d as a multiple of alpha, and its code q of a level (alpha's multiple)."""

    name: str
    block: int
    d_per_alpha: float
    code: object  # level array -> q (integer array)
    pack: object  # (q [blocks, block] uint8, d [blocks] float32) -> bytes [blocks, n]


TYPES = {
    8: BlockType("Q8_0", 32, 1.0, lambda v: v, _q8_0),
    6: BlockType("Q6_K", 256, 1.0, lambda v: v + 32, _q6_k),
    5: BlockType("Q5_0", 32, 1.0, lambda v: v + 16, _q5_0),
    4: BlockType("Q4_0", 32, 1.0, lambda v: v + 8, _q4_0),
    3: BlockType("Q3_K", 256, 1.0, lambda v: v + 4, _q3_k),
    2: BlockType("Q2_K", 256, 0.25, lambda v: 2 * v + 1.5, _q2_k),  # levels +-1/4, +-3/4
    1.58: BlockType("TQ2_0", 256, 2 / 3, lambda v: 1.5 * v + 1, _tq2_0),  # levels 0, +-2/3
    1: BlockType("TQ2_0", 256, 1.0, lambda v: v + 1, _tq2_0),  # levels +-1: q 0 and 2
}


def _check(pairs, q: quant.QuantConfig):
    """Refuse, before anything is written, what no type holds exactly."""
    for m in pairs:
        t = TYPES[m.bits]
        n_in = int(np.shape(m.w_IO)[0])
        where = "/".join(m.weight_path)
        if n_in % t.block:
            raise GGUFExportError(
                f"--format=gguf: {where} has rows of {n_in} weights (its input features), not a "
                f"multiple of {t.name}'s {t.block}-weight block for {m.bits:g} bits. The types "
                f"of 4, 5 and 8 bits take rows of a multiple of 32; those of 1, 1.58, 2, 3 and "
                f"6 bits a multiple of 256 (d_model and d_ff)")
        if q.granularity == "group" and q.group_size % t.block:
            raise GGUFExportError(
                f"--format=gguf: quant.group_size={q.group_size} scales cannot be the scales of "
                f"{t.name}'s {t.block}-weight blocks ({m.bits:g} bits): groups of a multiple of "
                f"{t.block} map exactly, as do quant.granularity='channel' and 'tensor'")


def encode(m: qparams.Quantized, gguf) -> tuple[np.ndarray, str, float]:
    """One quantized matrix as llama.cpp blocks: (bytes [rows, bytes per row], type name,
    the largest |weight change| against our served weight, by gguf's own dequantization).
    Rows are output channels (the embedding's: tokens), blocked along the input features."""
    t = TYPES[m.bits]
    w_IO = np.asarray(m.w_IO, np.float32)
    n_in, n_out = w_IO.shape
    # alpha [1, O] (channel), [1, 1] (tensor) or [K, 1, O] (K input groups) as [K, O]
    alpha = np.asarray(m.alpha, np.float32)
    alpha = np.broadcast_to(alpha.reshape(-1, alpha.shape[-1]), (alpha.size // alpha.shape[-1],
                                                                  n_out))
    alpha = np.maximum(alpha, quant.SCALE_FLOOR)
    codes = quant.to_codes(w_IO, m.alpha, m.quantizer, m.group)  # [I, O]
    levels = m.quantizer.from_codes(codes.astype(np.float32))
    served = (np.repeat(alpha, n_in // alpha.shape[0], axis=0) * levels).T  # [O, I]
    d = np.repeat(alpha, n_in // t.block // alpha.shape[0], axis=0).T.reshape(-1)  # per block
    d = (d * np.float32(t.d_per_alpha)).astype(np.float32)
    if not np.all(np.abs(d) < 65504):
        raise GGUFExportError(f"{'/'.join(m.weight_path)}: a scale of {float(d.max()):.4g} is "
                              f"beyond fp16's range (65504), which llama.cpp's blocks store")
    q = (np.rint(t.code(levels.T.reshape(-1, t.block))).astype(np.int64) & 0xFF).astype(
        np.uint8)
    data = t.pack(q, d).reshape(n_out, -1)
    dtype = gguf.GGMLQuantizationType[t.name]
    change = float(np.max(np.abs(gguf.quants.dequantize(data, dtype).reshape(served.shape)
                                 - served)))
    return data, t.name, change


def rope_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """The row order that takes a q or k projection from the Hugging Face RoPE layout (each
    head's first half of dimensions, then its second) to llama.cpp's (the pairs interleaved)."""
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, 2, half).transpose(0, 2, 1).reshape(-1)


def export(params, m: ModelSpec, q: quant.QuantConfig, out: str | Path, tokenizer: str) -> dict:
    """Write the model `m`'s parameters `params` (any layout), quantized by `q`, as the GGUF
    file `out` (must not exist); returns what was written and the largest weight change from
    fp16 scales."""
    import gguf

    from qat_jax.tools import hf

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; nothing is overwritten: choose another --out")
    params = layout.unstack_layers(params)
    pairs = qparams.quantized_pairs(params, q)
    _check(pairs, q)
    hf_names = hf.tensor_names(m.n_layers, m.tie_embeddings)  # ours -> Hugging Face's
    to_gguf = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, m.n_layers)
    quantized = {"/".join(p.weight_path): p for p in pairs}
    flat = {"/".join(k): v for k, v in _flatten(params).items()}
    tensors, change, types = [], 0.0, {}
    for ours, theirs in hf_names.items():
        name = to_gguf.get_name(theirs, try_suffixes=(".weight",))
        if ours in quantized:
            data, kind, c = encode(quantized[ours], gguf)
            change = max(change, c)
            dtype = gguf.GGMLQuantizationType[kind]
        else:
            x = np.asarray(flat[ours], np.float32)
            x = x.T if ours.endswith("/kernel") else x  # [out, in], as theirs
            is_norm = x.ndim == 1
            data = x if is_norm else x.astype(np.float16)
            dtype = gguf.GGMLQuantizationType.F32 if is_norm else gguf.GGMLQuantizationType.F16
        heads = {"attn/q/kernel": m.n_heads, "attn/k/kernel": m.n_kv_heads}.get(
            ours.split("/", 1)[-1])
        if heads:
            data = data[rope_rows(data.shape[0], heads)]
        tensors.append((name, np.ascontiguousarray(data), dtype))
        types[dtype.name] = types.get(dtype.name, 0) + 1

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _metadata(writer, m, tokenizer, gguf)
        for name, data, dtype in tensors:
            writer.add_tensor(name, data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "tensors": len(tensors), "types": types,
            "max_weight_change": change, "bytes": out.stat().st_size}


def _flatten(params) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(params)


def _metadata(writer, m: ModelSpec, tokenizer: str, gguf):
    import sentencepiece as spm

    writer.add_name("qat_jax")
    writer.add_context_length(m.seq_len)
    writer.add_embedding_length(m.d_model)
    writer.add_block_count(m.n_layers)
    writer.add_feed_forward_length(m.d_ff)
    writer.add_head_count(m.n_heads)
    writer.add_head_count_kv(m.n_kv_heads)
    writer.add_rope_dimension_count(m.d_model // m.n_heads)
    writer.add_rope_freq_base(float(m.rope_theta))
    writer.add_layer_norm_rms_eps(float(m.norm_eps))
    writer.add_vocab_size(m.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    kinds = gguf.TokenType
    types = [kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i)
             else kinds.BYTE if sp.is_byte(i) else kinds.UNUSED if sp.is_unused(i)
             else kinds.NORMAL for i in range(sp.vocab_size())]
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    # The model's table may be longer than the tokenizer's (a rounded vocabulary): unused.
    pieces += [f"[UNUSED_{i}]" for i in range(len(pieces), m.vocab_size)]
    types += [kinds.UNUSED] * (m.vocab_size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())]
                            + [0.0] * (m.vocab_size - sp.vocab_size()))
    writer.add_token_types([int(t) for t in types])
    if sp.bos_id() >= 0:
        writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(False)  # our documents start without BOS, and so do prompts
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(sp.encode_as_pieces("a")[0].startswith("\u2581"))
