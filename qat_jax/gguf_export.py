"""`qat-jax export --format=gguf`: the served model as a llama.cpp GGUF file, every quantized
matrix in the llama.cpp block type its quantizer maps onto, code for code.

llama.cpp's 32-weight block types store one fp16 scale d per block and integer codes q:
    Q8_0   w = d * q,         q int8                  (our 8-bit LSQ level, -128..127)
    Q5_0   w = d * (q - 16),  q 0..31 (4 + 1 bits)    (our 5-bit LSQ code, level + 16)
    Q4_0   w = d * (q - 8),   q 0..15                 (our 4-bit LSQ code, level + 8)
so with d = alpha (our scale of that block's row, or of its group) a block holds exactly our
served weight alpha * level: the codes are ours, the only change is alpha rounded to fp16
(reported as the largest weight change; none where alpha is an fp16 number already). Rows are
blocked along the input features, so a per-output-channel scale is every block's d, a
per-tensor one too, and per-group scales map where the group is a multiple of 32.

The other bit widths (1, 1.58, 2, 3 and 6 bits) map onto llama.cpp's 256-weight K-quant and
ternary blocks (Q6_K, Q3_K, Q2_K, TQ2_0); they are refused for now, naming what maps.

Also in the file: the llama architecture's metadata, the run's sentencepiece tokenizer as
GGUF tokenizer metadata (llama.cpp tokenizes as we do: no BOS, the pieces and their scores),
the norms in F32, and an unquantized embedding or head in F16. q and k rows are permuted from
the Hugging Face RoPE layout (halves) to llama.cpp's (interleaved pairs). Written with `gguf`,
llama.cpp's own writer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qat_jax import quant
from qat_jax.errors import ConfigError

BLOCK = 32  # weights per block of Q8_0, Q5_0 and Q4_0


class GGUFExportError(ConfigError):
    """A model (bit width, granularity, shape) that no llama.cpp type holds exactly."""


def _pack_q8_0(levels: np.ndarray) -> np.ndarray:
    """[blocks, 32] levels -128..127 -> their 32 int8 bytes."""
    return levels.astype(np.int8).view(np.uint8)


def _pack_q4_0(codes: np.ndarray) -> np.ndarray:
    """[blocks, 32] codes 0..15 -> 16 bytes: byte j holds code j (low nibble) and j + 16."""
    c = codes.astype(np.uint8)
    return c[:, :16] | (c[:, 16:] << 4)


def _pack_q5_0(codes: np.ndarray) -> np.ndarray:
    """[blocks, 32] codes 0..31 -> 4 bytes of fifth bits (bit j of a little-endian uint32 is
    code j's), then 16 bytes of low nibbles as Q4_0."""
    c = codes.astype(np.uint8)
    high = np.packbits((c >> 4) & 1, axis=-1, bitorder="little")
    return np.concatenate([high, _pack_q4_0(c & 0x0F)], axis=-1)


# bit width -> (gguf type name, packer of [blocks, 32] codes, offset of a level in the code)
TYPES = {8: ("Q8_0", _pack_q8_0, 0), 5: ("Q5_0", _pack_q5_0, 16), 4: ("Q4_0", _pack_q4_0, 8)}


def mappable(bits) -> bool:
    return bits in TYPES


def _check(pairs, q: quant.QuantConfig):
    """Refuse, before anything is written, what no type here holds exactly."""
    bad_bits = sorted({m.bits for m in pairs if not mappable(m.bits)})
    if bad_bits:
        raise GGUFExportError(
            f"--format=gguf: {', '.join(f'{b:g}' for b in bad_bits)}-bit matrices have no "
            f"llama.cpp type written here yet; 4, 5 and 8 bits map exactly (Q4_0, Q5_0, Q8_0). "
            f"(1, 1.58, 2, 3 and 6 bits map onto the 256-weight K-quant and ternary types, not "
            f"written yet.) Use --format=packed or --format=hf for this run")
    if q.granularity == "group" and q.group_size % BLOCK:
        raise GGUFExportError(
            f"--format=gguf: quant.group_size={q.group_size} scales cannot be the scales of "
            f"llama.cpp's {BLOCK}-weight blocks; groups of a multiple of {BLOCK} map exactly, "
            f"as do quant.granularity='channel' and 'tensor'")
    rows = sorted({int(np.shape(m.w_IO)[0]) for m in pairs if np.shape(m.w_IO)[0] % BLOCK})
    if rows:
        raise GGUFExportError(
            f"--format=gguf: rows of {', '.join(map(str, rows))} weights (a matrix's input "
            f"features) are not a multiple of the {BLOCK}-weight block; d_model, d_ff and the "
            f"embedding width must be multiples of {BLOCK}")


def encode(m: quant.Quantized) -> tuple[np.ndarray, str, float]:
    """One quantized matrix as llama.cpp blocks: (bytes [rows, bytes per row], type name,
    the largest |weight change| from rounding its scales to fp16). Rows are output channels
    (the embedding's: tokens), blocked along the input features."""
    name, pack, offset = TYPES[m.bits]
    w_IO = np.asarray(m.w_IO, np.float32)
    n_in, n_out = w_IO.shape
    # alpha [1, O] (channel), [1, 1] (tensor) or [K, 1, O] (K input groups) as [K, O]
    alpha = np.asarray(m.alpha, np.float32)
    alpha = np.broadcast_to(alpha.reshape(-1, alpha.shape[-1]), (alpha.size // alpha.shape[-1],
                                                                  n_out))
    alpha = np.maximum(alpha, quant.SCALE_FLOOR)
    codes = quant.to_codes(w_IO, m.alpha, m.quantizer, m.group).astype(np.int64)  # [I, O]
    levels = m.quantizer.from_codes(codes.astype(np.float32))
    # one scale per (block, output channel): alpha's rows are the input groups, or one row
    d = np.repeat(alpha, n_in // BLOCK // alpha.shape[0], axis=0)  # [I / 32, O]
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    if not np.all(np.isfinite(d16)):
        raise GGUFExportError(f"{'/'.join(m.weight_path)}: a scale of {float(d.max()):.4g} is "
                              f"beyond fp16's range (65504), which llama.cpp's blocks store")
    by_block = levels.reshape(n_in // BLOCK, BLOCK, n_out)
    change = float(np.max(np.abs(d16.astype(np.float32)[:, None] * by_block
                                 - d[:, None] * by_block)))
    stored = (levels if offset == 0 else levels + offset).T  # [O, I]: ours is I-major
    blocks = stored.reshape(n_out * n_in // BLOCK, BLOCK)
    scales = d16.T.reshape(-1, 1).view(np.uint8)  # [O * I / 32, 2], block order as `blocks`
    data = np.concatenate([scales, pack(blocks)], axis=-1)
    return data.reshape(n_out, -1), name, change


def rope_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """The row order that takes a q or k projection from the Hugging Face RoPE layout (each
    head's first half of dimensions, then its second) to llama.cpp's (the pairs interleaved)."""
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, 2, half).transpose(0, 2, 1).reshape(-1)


def export(params, config, out: str | Path, tokenizer: str) -> dict:
    """Write the quantized model `params` (any layout) as the GGUF file `out` (must not exist);
    returns what was written and the largest weight change from fp16 scales."""
    import gguf

    from qat_jax import hf

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; nothing is overwritten: choose another --out")
    q = quant.QuantConfig.from_config(config)
    params = quant.unstack_layers(params)
    pairs = quant.quantized_pairs(params, q)
    _check(pairs, q)
    m = config.model
    hf_names = hf.tensor_names(m.n_layers, m.tie_embeddings)  # ours -> Hugging Face's
    to_gguf = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, m.n_layers)
    quantized = {"/".join(p.weight_path): p for p in pairs}
    flat = {"/".join(k): v for k, v in _flatten(params).items()}
    tensors, change, types = [], 0.0, {}
    for ours, theirs in hf_names.items():
        name = to_gguf.get_name(theirs, try_suffixes=(".weight",))
        if ours in quantized:
            data, kind, c = encode(quantized[ours])
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
        _metadata(writer, config, tokenizer, gguf)
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


def _metadata(writer, config, tokenizer: str, gguf):
    import sentencepiece as spm

    m = config.model
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
