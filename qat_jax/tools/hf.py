"""Llama checkpoints in the Hugging Face layout: read one into a qat_jax model, write one out.

A Hugging Face Llama directory holds config.json (architectures ['LlamaForCausalLM']), the
weights as safetensors (model.safetensors, or shards listed by model.safetensors.index.json),
and usually the sentencepiece tokenizer.model. Its layers are our decoder's one for one: the
same RMSNorm, the half-split RoPE layout (Hugging Face's rotate_half, which ours is), SwiGLU,
grouped-query attention, no biases. A torch Linear stores its weight [out, in]; our Dense
kernels are [in, out], so every projection is transposed on the way in and out.

    model.embed_tokens.weight                    embed                        [V, D]
    model.layers.N.self_attn.{q,k,v,o}_proj      block_N/attn/{q,k,v,o}/kernel  transposed
    model.layers.N.mlp.{gate,up,down}_proj       block_N/mlp/{gate,up,down}/kernel
    model.layers.N.input_layernorm               block_N/attn_norm/scale
    model.layers.N.post_attention_layernorm      block_N/mlp_norm/scale
    model.norm                                   final_norm/scale
    lm_head.weight                               head (untied); tied: absent or = embed

Export writes the weights as served (a quantized run's fake-quantized weights, which any Llama
implementation runs as they are) and records the quantization: config.json's `qat_jax` entry
(bits, granularity, group size; not `quantization_config`, which transformers reserves for
quantizers it applies itself) and each quantized matrix's scales in
qat_jax_scales.safetensors, under the weight's name. An import
reads the scales back, so import -> export -> import keeps the weights bit for bit and the
integer codes exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qat_jax import files, layout, qparams, quant
from qat_jax.errors import ConfigError, os_error_in
from qat_jax.sizes import ModelSpec

SCALES_FILE = "qat_jax_scales.safetensors"
CONFIG_ENTRY = "qat_jax"  # config.json's record of the quantization
# Our config keys and the Hugging Face LlamaConfig fields they equal.
KEYS = {"model.vocab_size": "vocab_size", "model.d_model": "hidden_size",
        "model.n_layers": "num_hidden_layers", "model.n_heads": "num_attention_heads",
        "model.n_kv_heads": "num_key_value_heads", "model.d_ff": "intermediate_size",
        "model.rope_theta": "rope_theta", "model.norm_eps": "rms_norm_eps",
        "model.tie_embeddings": "tie_word_embeddings"}
_PROJECTIONS = {"self_attn.q_proj": "attn/q", "self_attn.k_proj": "attn/k",
                "self_attn.v_proj": "attn/v", "self_attn.o_proj": "attn/o",
                "mlp.gate_proj": "mlp/gate", "mlp.up_proj": "mlp/up", "mlp.down_proj": "mlp/down"}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}


class HFError(ConfigError):
    """A Hugging Face directory that is not a Llama checkpoint qat_jax can run."""


def read_config(directory: str | Path) -> dict:
    """config.json of a Llama checkpoint, with every field our decoder depends on checked."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise HFError(f"{directory}: no config.json (a Hugging Face model directory has one)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise HFError(f"{path} is not JSON: {e}") from None
    arch = hf.get("architectures") or [None]
    if hf.get("model_type") != "llama" or arch[0] != "LlamaForCausalLM":
        raise HFError(f"{path}: model_type {hf.get('model_type')!r}, architectures {arch}; "
                      f"qat_jax runs Llama (model_type 'llama', LlamaForCausalLM)")
    hf.setdefault("num_key_value_heads", hf.get("num_attention_heads"))
    hf.setdefault("rope_theta", 10000.0)
    hf.setdefault("tie_word_embeddings", False)
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "rope_scaling": (hf.get("rope_scaling"), None),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
    }
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        unsupported["head_dim"] = (head_dim, hf["hidden_size"] // hf["num_attention_heads"])
    for key, (value, want) in unsupported.items():
        if value != want:
            raise HFError(f"{path}: {key}={value!r}; qat_jax's decoder has {key}={want!r} "
                          f"(SwiGLU, unscaled RoPE, no biases)")
    return hf


def config_overrides(hf: dict) -> dict:
    """Our config keys set to a Llama checkpoint's shapes (for --config.KEY=VALUE)."""
    return {ours: hf[theirs] for ours, theirs in KEYS.items()}


def check_matches(spec: ModelSpec, directory: str | Path):
    """ConfigError listing every model key of `spec` (the config's model.* shape) that
    differs from the checkpoint's, with the flags that would match it."""
    hf = read_config(directory)
    wrong = {k: v for k, v in config_overrides(hf).items()
             if _get(spec, k) != type(_get(spec, k))(v)}
    if wrong:
        flags = " ".join(f"--config.{k}={v}" for k, v in wrong.items())
        have = ", ".join(f"{k}={_get(spec, k)}" for k in wrong)
        raise HFError(f"model.init_from={directory}: the checkpoint's shapes differ from the "
                      f"config ({have}); run with {flags}")


def _get(spec: ModelSpec, key: str):
    """The value of config key `key` (model.NAME, a KEYS key) in `spec`."""
    return getattr(spec, key.removeprefix("model."))


def read_tensors(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint by name, sharded (model.safetensors.index.json) or not."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = files.read_json(index, "write the checkpoint again").get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFError(f"{index} has no weight_map object (tensor name -> shard file); "
                          f"write the checkpoint again")
        shards = sorted(set(map(str, weight_map.values())))
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise HFError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                      f"(PyTorch .bin checkpoints are not read: save with safetensors)")
    tensors = {}
    for name in shards:
        tensors.update(_read_safetensors(directory / name))
    return tensors


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file; one that is missing, truncated or not safetensors
    is an HFError naming it."""
    try:
        with safe_open(str(path), "numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        detail = (str(e).splitlines() or [""])[0][:200]
        raise HFError(f"{path} is not a readable safetensors file ({detail}): it may be "
                      f"truncated (an interrupted download or copy); fetch or write it "
                      f"again") from None


def load_params(directory: str | Path, m: ModelSpec, q: quant.QuantConfig) -> dict:
    """Our parameter tree (the loop layout, float32) of the checkpoint in `directory`; the
    quantizer scales from its qat_jax_scales.safetensors when it has one (a qat_jax export),
    else ones (set at the switch, as for any run). `m`: the architecture it must match; `q`:
    the quantizer whose scale shapes it reads."""
    check_matches(m, directory)
    t = read_tensors(directory)
    flat, want = {}, {}

    def take(name, ours, transpose=False, shape=None):
        if name not in t:
            raise HFError(f"{directory}: tensor {name} is missing")
        x = np.asarray(t[name], np.float32)
        x = x.T if transpose else x
        if shape is not None and x.shape != shape:
            raise HFError(f"{directory}: {name} has shape {t[name].shape}, the config needs "
                          f"{shape[::-1] if transpose else shape}")
        flat[ours] = x
        want[ours] = name

    D, E = m.d_model, m.d_model // m.n_heads
    sizes = {"attn/q": (D, m.n_heads * E), "attn/k": (D, m.n_kv_heads * E),
             "attn/v": (D, m.n_kv_heads * E), "attn/o": (m.n_heads * E, D),
             "mlp/gate": (D, m.d_ff), "mlp/up": (D, m.d_ff), "mlp/down": (m.d_ff, D)}
    take("model.embed_tokens.weight", "embed", shape=(m.vocab_size, D))
    take("model.norm.weight", "final_norm/scale", shape=(D,))
    for i in range(m.n_layers):
        for theirs, ours in _PROJECTIONS.items():
            take(f"model.layers.{i}.{theirs}.weight", f"block_{i}/{ours}/kernel", True,
                 sizes[ours])
        for theirs, ours in _NORMS.items():
            take(f"model.layers.{i}.{theirs}.weight", f"block_{i}/{ours}/scale", shape=(D,))
    tables = ["embed"]
    if not m.tie_embeddings:
        take("lm_head.weight", "head", shape=(m.vocab_size, D))
        tables.append("head")
    elif "lm_head.weight" in t and not np.array_equal(t["lm_head.weight"],
                                                      t["model.embed_tokens.weight"]):
        raise HFError(f"{directory}: lm_head.weight differs from the embedding, but "
                      f"config.json says tie_word_embeddings=true")
    scales = _read_scales(directory)
    for ours in [k for k in flat if k.endswith("/kernel")] + tables:
        name = want[ours]
        scale_key = (ours.replace("kernel", "quant_scale") if ours not in tables
                     else f"{ours}_quant_scale")
        shape = quant.scale_shape((D, m.vocab_size) if ours in tables else flat[ours].shape,
                                  q.granularity, q.group_size)
        flat[scale_key] = scales.get(name, np.ones(shape, np.float32))
        if flat[scale_key].shape != shape:
            raise HFError(f"{directory}/{SCALES_FILE}: the scales of {name} have shape "
                          f"{flat[scale_key].shape}, quant.granularity={q.granularity!r} needs "
                          f"{shape}: set the quant keys config.json's qat_jax entry records")
    return traverse_util.unflatten_dict(flat, sep="/")


def _read_scales(directory) -> dict[str, np.ndarray]:
    path = Path(directory) / SCALES_FILE
    if not path.is_file():
        return {}
    return {k: np.asarray(v, np.float32) for k, v in _read_safetensors(path).items()}


def hf_config(m: ModelSpec, q: quant.QuantConfig, dtype: str = "float32",
              quantized: bool = False) -> dict:
    """config.json of the model `m` as a Hugging Face LlamaForCausalLM (with the quantization
    `q` recorded when its weights are the quantized ones)."""
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          **{theirs: _get(m, ours) for ours, theirs in KEYS.items()},
          "head_dim": m.d_model // m.n_heads, "hidden_act": "silu",
          "max_position_embeddings": m.seq_len,
          "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
          "initializer_range": m.init_std, "torch_dtype": dtype, "use_cache": True}
    if quantized:
        hf[CONFIG_ENTRY] = {
            "bits": q.bits, "granularity": q.granularity,
            "group_size": q.group_size, "quantize_embedding": q.quantize_embedding,
            "embedding_bits": quant.embedding_bits(q.bits) if q.quantize_embedding else None,
            "scales": SCALES_FILE,
            "note": "weights are stored as served (scale x level); the scales let a reader "
                    "recover the integer codes"}
    return hf


def export(params, m: ModelSpec, q: quant.QuantConfig, out: str | Path, quantized: bool,
           tokenizer: str | None = None, dtype: str = "float32") -> dict:
    """Write `params` (any layout) of the model `m`, quantized by `q` when `quantized`, as a
    Hugging Face Llama directory `out` (must not exist):
    the weights as served (fake-quantized when `quantized`), their scales, config.json and the
    tokenizer. Returns what was written."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; nothing is overwritten: choose another --out")
    pairs = qparams.quantized_pairs(params, q) if quantized else []
    served = qparams.served_params(params, q) if quantized else layout.unstack_layers(params)
    flat = traverse_util.flatten_dict(served, sep="/")
    np_dtype = {"float32": np.float32, "bfloat16": _bf16()}[dtype]
    names = tensor_names(m.n_layers, m.tie_embeddings)
    tensors = {theirs: np.ascontiguousarray(
        np.asarray(flat[ours], np.float32).T if ours.endswith("/kernel") else
        np.asarray(flat[ours], np.float32)).astype(np_dtype) for ours, theirs in names.items()}
    scales = {names["/".join(p.weight_path)]: np.asarray(p.alpha, np.float32) for p in pairs}
    hf = hf_config(m, q, dtype, quantized)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, out, "model.safetensors",
               lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        if scales:
            _write(tmp, out, SCALES_FILE, lambda p: save_file(scales, p))
        _write(tmp, out, "config.json",
               lambda p: Path(p).write_text(json.dumps(hf, indent=2) + "\n"))
        if tokenizer:
            _write(tmp, out, "tokenizer.model", lambda p: shutil.copyfile(tokenizer, p))
    except BaseException:  # a full disk, Ctrl-C: nothing is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)  # the directory appears whole or not at all
    return {"path": str(out), "tensors": len(tensors), "quantized_matrices": len(scales),
            "bytes": sum(x.nbytes for x in tensors.values())}


def _write(tmp: Path, out: Path, name: str, write):
    """write(path) of one file of the export; its failure (safetensors reports one as its own
    error, in words) is an OSError naming the file as it would have been under `out`."""
    try:
        write(str(tmp / name))
    except (OSError, SafetensorError) as e:
        error = (OSError(e.errno, e.strerror, str(out / name)) if isinstance(e, OSError)
                 else os_error_in(e, str(out / name)))
        if error is None:
            raise
        raise error from None


def tensor_names(n_layers: int, tied: bool) -> dict[str, str]:
    """Our parameter paths -> Hugging Face tensor names."""
    out = {"embed": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight",
           **({} if tied else {"head": "lm_head.weight"})}
    for i in range(n_layers):
        out.update({f"block_{i}/{ours}/kernel": f"model.layers.{i}.{theirs}.weight"
                    for theirs, ours in _PROJECTIONS.items()})
        out.update({f"block_{i}/{ours}/scale": f"model.layers.{i}.{theirs}.weight"
                    for theirs, ours in _NORMS.items()})
    return out


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16
