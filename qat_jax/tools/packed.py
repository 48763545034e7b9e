"""Export of the real quantized model: packed integer codes plus scales, in one safetensors file.

Why safetensors: a flat, memory-mappable file of named tensors with a JSON header, readable
from numpy, JAX, PyTorch or Rust without our code, and safe to load (no pickle).

Layout (format "qat_jax.export/1"):
    <path>.codes    uint8   the matrix's integer codes (quant.to_codes), packed densely by
                            Quantizer.pack: B bits each (ternary: 5 base-3 digits per byte)
    <path>.scale    float32 its scales (shape quant.scale_shape)
    <path>          bfloat16 (as served; `dtype` float32 on request) every unquantized tensor
                    (norms; the embedding unless quantized)
where <path> is the parameter's path joined by '/', e.g. block_0/attn/q/kernel, and the header
metadata holds "config" (the run's config, JSON) and "quantized" (JSON: for each quantized
path its bits, shape and whether it is stored transposed; the tied embedding is quantized as
the head's embed^T). Dequantized, the matrices are exactly the fake-quantized weights, so the
full-precision model on them reproduces the QAT model's forward (with its unquantized tensors
rounded to bfloat16, or exactly with dtype float32). The tensors take sizes.served_bytes:
the size rule S and the planner use.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save

from qat_jax import files, layout, phases, qparams, quant, sizes
from qat_jax.errors import UserError


class ExportError(UserError, ValueError):
    """A file given as an export that is not one `qat-jax export` wrote, or is damaged."""

# The scale of a matrix that stays unquantized (the embedding's or an untied head's, unless
# quantized) is unused.
_UNUSED_SCALES = ("embed_quant_scale", "head_quant_scale")

FORMAT = "qat_jax.export/1"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}  # of the unquantized tensors


def _name(path) -> str:
    return "/".join(path)


def export_params(params, run: phases.Run, out: str | Path, dtype: str = "bfloat16") -> dict:
    """Write the quantized model of `params` (`run`'s, whose quant.bits must be set; its
    config is recorded in the file) to `out`, its
    unquantized tensors in `dtype`; returns sizes: `quantized_bytes` (packed codes),
    `quantized_bf16_bytes` (the same matrices in bf16), `tensor_bytes` (all tensors),
    `file_bytes` (with the header) and `bf16_model_bytes` (the full-precision model in bf16,
    sizes.served_bytes)."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r}; valid: {sorted(DTYPES)}")
    q = run.quant
    if q.bits is None:
        raise ValueError("quant.bits is None: a full-precision run has no quantized model to "
                         "export (train with --config.quant.bits=B)")
    out = files.path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; nothing is overwritten: choose another --out")
    params = layout.unstack_layers(jax.device_get(params))  # one layout: the loop's
    tensors, table = {}, {}
    stored_as_codes = set()  # parameter paths stored as codes + scale
    packed_bytes = weights = 0
    for m in qparams.quantized_pairs(params, q):
        name, scale_name = _name(m.weight_path), _name(m.scale_path)
        codes = quant.to_codes(np.asarray(m.w_IO), np.asarray(m.alpha), m.quantizer, m.group)
        tensors[f"{name}.codes"] = m.quantizer.pack(codes)
        tensors[f"{name}.scale"] = np.asarray(m.alpha, np.float32)
        table[name] = {"bits": m.bits, "shape": list(np.shape(m.w_IO)),
                       "transposed": m.transposed, "scale_param": scale_name}
        stored_as_codes.update((name, scale_name))
        packed_bytes += tensors[f"{name}.codes"].nbytes
        weights += int(np.size(m.w_IO))
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = _name(p.key for p in path)
        if name not in stored_as_codes and name.rsplit("/", 1)[-1] not in _UNUSED_SCALES:
            tensors[name] = np.asarray(x, np.float32).astype(DTYPES[dtype])
    meta = {"format": FORMAT, "config": run.config.to_json_best_effort(),
            "quantized": json.dumps(table)}
    blob = save(tensors, metadata=meta)
    files.atomic_write(out, blob)  # never half an export under its name
    return {"path": str(out), "quantized_bytes": packed_bytes,
            "quantized_bf16_bytes": 2 * weights, "file_bytes": len(blob),
            "tensor_bytes": sum(t.nbytes for t in tensors.values()), "dtype": dtype,
            "bf16_model_bytes": sizes.served_bytes(run.model, q)["total"],
            "quantized_matrices": len(table)}


def load(path: str | Path) -> tuple[dict, dict]:
    """(config dict, params tree) of an export, every matrix dequantized to float32: the
    full-precision model (quant.bits=None) on these params is the quantized model."""
    if not Path(path).is_file():
        raise ExportError(f"{path}: no such export file (write one with `qat-jax export`)")
    try:
        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ExportError(f"{path}: not a qat_jax export (format "
                                  f"{meta.get('format')!r}, expected {FORMAT!r}); give a file "
                                  f"`qat-jax export` wrote")
            table = json.loads(meta["quantized"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            config = json.loads(meta["config"])
    except ExportError:
        raise
    except Exception as e:  # safetensors raises its own types for a file that is not one
        raise ExportError(f"{path} is not a readable safetensors export ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:120]}); write it again with "
                          f"`qat-jax export`") from None
    flat = {}  # "/"-joined parameter paths -> arrays

    q = config["quant"]
    group = q["group_size"] if q["granularity"] == "group" else 0
    for name, info in table.items():
        qz, shape = quant.quantizer(info["bits"]), tuple(info["shape"])
        codes = qz.unpack(tensors[f"{name}.codes"], int(np.prod(shape))).reshape(shape)
        w = quant.from_codes(codes, tensors[f"{name}.scale"], qz, group)
        flat[name] = w.T if info["transposed"] else w
        flat[info["scale_param"]] = tensors[f"{name}.scale"]
    for name, value in tensors.items():
        if not name.endswith((".codes", ".scale")):
            flat[name] = np.asarray(value, np.float32)
    params = traverse_util.unflatten_dict(flat, sep="/")
    config["model"]["scan_layers"] = False  # tensors are stored per layer (block_0, ...)
    m = config["model"]
    for table in [t for t in ("embed", "head") if t in params]:
        if f"{table}_quant_scale" not in params:  # not stored: unused by an unquantized table
            params[f"{table}_quant_scale"] = np.ones(quant.scale_shape(
                (m["d_model"], m["vocab_size"]), q["granularity"], q["group_size"]), np.float32)
    return config, params
