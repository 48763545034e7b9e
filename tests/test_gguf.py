"""GGUF export (llama.cpp): every mapped type dequantizes, by `gguf`'s own numpy code, to our
served weights (bit for bit with fp16-number scales; within the reported fp16 rounding, codes
exact, otherwise); what does not map is refused before anything is written; the RoPE row order
is llama.cpp's; the tokenizer is ours; and, where llama-cpp-python is installed (the
`[llamacpp]` extra), llama.cpp itself runs the file as we do."""

import importlib.util
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_FLAGS, overrides_to_flags, run_cli, small_config
from flax import traverse_util

from qat_jax import data, gguf_export, hf, model, quant

gguf = pytest.importorskip("gguf")


def _params(config, seed=0, fp16_scales=True):
    """A random model's parameters with its scales set from its weights; with `fp16_scales`
    each scale is an fp16 number (as the fp16-scale training setting makes them)."""
    params = jax.device_get(nn.unbox(model.Decoder(model.ModelConfig.from_config(config)).init(
        jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]))
    params = jax.device_get(quant.init_scales(params, quant.QuantConfig.from_config(config)))
    if not fp16_scales:
        return params
    flat = traverse_util.flatten_dict(params)
    flat = {k: (np.asarray(v, np.float16).astype(np.float32) if "quant_scale" in k[-1] else v)
            for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat)


def _config(cache_dir, bits, **keys):
    return small_config(cache_dir, **{"quant.bits": float(bits),
                                      "quant.quantize_embedding": True, **keys})


def _read(path, config):
    """{our parameter path: (gguf's dequantization as [out, in] in our row order, type name)}"""
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    to_gguf = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.model.n_layers)
    out = {}
    for ours, theirs in hf.tensor_names(config.model.n_layers, config.model.tie_embeddings).items():
        t = by_name[to_gguf.get_name(theirs, try_suffixes=(".weight",))]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = w.reshape([int(n) for n in reversed(t.shape)])
        heads = {"attn/q/kernel": config.model.n_heads,
                 "attn/k/kernel": config.model.n_kv_heads}.get(ours.split("/", 1)[-1])
        if heads:  # back to our row order
            w = w[np.argsort(gguf_export.rope_rows(w.shape[0], heads))]
        out[ours] = (w, t.tensor_type.name)
    return reader, out


def _served(params, config):
    flat = traverse_util.flatten_dict(
        quant.served_params(params, quant.QuantConfig.from_config(config)), sep="/")
    return {k: np.asarray(v, np.float32).T if k.endswith("/kernel") else np.asarray(v)
            for k, v in flat.items()}


@pytest.mark.parametrize("bits,kind,granularity,group", [
    (4, "Q4_0", "channel", 0), (5, "Q5_0", "channel", 0), (8, "Q8_0", "channel", 0),
    (4, "Q4_0", "tensor", 0), (4, "Q4_0", "group", 32), (8, "Q8_0", "group", 64)])
def test_every_mapped_type_is_the_served_model_bit_for_bit(tmp_path, cache_dir, bits, kind,
                                                           granularity, group):
    config = _config(cache_dir, bits, **{"quant.granularity": granularity,
                                         "quant.group_size": group})
    params = _params(config)
    r = gguf_export.export(params, config, tmp_path / "m.gguf",
                           data.load_corpus(config).tokenizer_path)
    assert r["max_weight_change"] == 0.0
    n_matrices = 7 * config.model.n_layers + 1  # and the tied embedding
    assert r["types"] == {kind: n_matrices, "F32": 2 * config.model.n_layers + 1}  # norms
    _, read = _read(tmp_path / "m.gguf", config)
    served = _served(params, config)
    for ours, (w, name) in read.items():
        assert name == (kind if w.ndim == 2 else "F32"), ours
        np.testing.assert_array_equal(w, served[ours], err_msg=ours)


def test_scales_rounded_to_fp16_keep_the_codes_and_report_the_change(tmp_path, cache_dir):
    config = _config(cache_dir, 4)
    params = _params(config, fp16_scales=False)
    r = gguf_export.export(params, config, tmp_path / "m.gguf",
                           data.load_corpus(config).tokenizer_path)
    _, read = _read(tmp_path / "m.gguf", config)
    served = _served(params, config)
    worst = max(float(np.max(np.abs(w - served[k]))) for k, (w, _) in read.items())
    assert 0 < worst == pytest.approx(r["max_weight_change"], rel=1e-6)
    # the change is the scale's fp16 rounding only: each weight's level is ours
    q = quant.QuantConfig.from_config(config)
    for m in quant.quantized_pairs(params, q):
        ours = "/".join(m.weight_path)
        alpha16 = np.asarray(m.alpha, np.float16).astype(np.float32)  # [1, O]
        levels = read[ours][0].T / alpha16  # [I, O], like w_IO
        codes = quant.to_codes(np.asarray(m.w_IO), np.asarray(m.alpha), m.quantizer)
        np.testing.assert_array_equal(levels, m.quantizer.from_codes(codes.astype(np.float32)))


def test_file_size_is_llama_cpps_bits_per_weight(tmp_path, cache_dir):
    """Q4_0 stores 4.5 bits a weight, Q5_0 5.5, Q8_0 8.5 (an fp16 scale per 32 codes)."""
    sizes = {}
    for bits in (4, 5, 8):
        config = _config(cache_dir, bits)
        r = gguf_export.export(_params(config), config, tmp_path / f"{bits}.gguf",
                               data.load_corpus(config).tokenizer_path)
        reader = gguf.GGUFReader(str(tmp_path / f"{bits}.gguf"))
        quantized = [t for t in reader.tensors if t.tensor_type.name.startswith("Q")]
        weights = sum(int(t.n_elements) for t in quantized)
        sizes[bits] = 8 * sum(int(t.n_bytes) for t in quantized) / weights
        assert r["bytes"] > sum(int(t.n_bytes) for t in reader.tensors)  # + metadata
    assert sizes == {4: 4.5, 5: 5.5, 8: 8.5}


@pytest.mark.parametrize("keys,match", [
    ({"quant.bits": 2.0}, "2-bit matrices have no llama.cpp type written here yet; 4, 5 and 8 "
                          "bits map exactly"),
    ({"quant.granularity": "group", "quant.group_size": 16},
     "quant.group_size=16 scales cannot be the scales of llama.cpp's 32-weight blocks"),
    ({"model.d_ff": 80}, "rows of 80 weights (a matrix's input features) are not a multiple "
                         "of the 32-weight block"),
])
def test_what_does_not_map_is_refused_before_writing(tmp_path, cache_dir, keys, match):
    config = _config(cache_dir, 4, **keys)
    with pytest.raises(gguf_export.GGUFExportError, match=re.escape(match)):
        gguf_export.export(_params(config), config, tmp_path / "m.gguf",
                           data.load_corpus(config).tokenizer_path)
    assert list(tmp_path.iterdir()) == []


def test_rope_rows_turn_halves_into_llama_cpps_pairs():
    """Our RoPE rotates dimension i with i + E/2 (the Hugging Face layout); llama.cpp's
    rotates 2i with 2i + 1. A q row order that is rope_rows' turns one into the other."""
    H, E, L = 2, 8, 5
    x = np.random.default_rng(0).normal(size=(1, L, H, E)).astype(np.float32)
    ours = np.asarray(model.rope(jnp.asarray(x), jnp.arange(L), 10000.0))
    perm = gguf_export.rope_rows(H * E, H).reshape(H, E) % E  # within each head
    xp = x[..., perm[0]]
    angle = np.arange(L)[:, None] * 10000.0 ** (-np.arange(0, E, 2) / E)  # [L, E/2]
    a, b = xp[..., 0::2], xp[..., 1::2]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    theirs = np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(theirs, ours[..., perm[0]], atol=1e-5)


def test_the_file_carries_our_tokenizer_and_shape(tmp_path, cache_dir):
    import sentencepiece as spm

    config = _config(cache_dir, 4)
    tokenizer = data.load_corpus(config).tokenizer_path
    gguf_export.export(_params(config), config, tmp_path / "m.gguf", tokenizer)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))

    def value(key):
        field = reader.fields[key]
        if len(field.data) > 1:  # an array
            return [field.parts[i].tobytes().decode() if field.types[-1] == gguf.GGUFValueType
                    .STRING else field.parts[i][0] for i in field.data]
        part = field.parts[field.data[0]]
        return part.tobytes().decode() if field.types[0] == gguf.GGUFValueType.STRING \
            else part[0]

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "llama"
    assert value("tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert value("tokenizer.ggml.eos_token_id") == sp.eos_id()
    assert not value("tokenizer.ggml.add_bos_token")  # our documents start without BOS
    m = config.model
    assert value("llama.embedding_length") == m.d_model
    assert value("llama.block_count") == m.n_layers
    assert value("llama.attention.head_count_kv") == m.n_kv_heads
    assert value("llama.rope.freq_base") == pytest.approx(m.rope_theta)


@pytest.mark.slow
def test_export_command_writes_gguf(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    flags = {**SMALL_FLAGS, "quant.bits": 4.0, "qat.fraction_policy": "fixed",
             "qat.fraction": 0.5}
    run_cli(["train", f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
             *overrides_to_flags(flags)])
    out = tmp_path / "m.gguf"
    proc = run_cli(["export", f"--workdir={workdir}", f"--out={out}", "--format=gguf"])
    # the embedding is not quantized here (quant.quantize_embedding=False): F16
    assert "llama.cpp GGUF of a 4-bit run, 20 tensors (1 F16, 5 F32, 14 Q4_0)" in proc.stdout
    assert "the codes exact" in proc.stdout or "exactly as served" in proc.stdout
    again = run_cli(["export", f"--workdir={workdir}", f"--out={out}", "--format=gguf"],
                    check=False)
    assert again.returncode == 1 and "nothing is overwritten" in again.stderr
    bad = run_cli(["export", f"--workdir={workdir}", f"--out={tmp_path / 'x.gguf'}",
                   "--format=gguf", "--dtype=float32"], check=False)
    assert bad.returncode == 2 and "--dtype is not read with --format=gguf" in bad.stderr
    result = json.loads((workdir / "result.json").read_text())
    assert result["qat_fraction"] == pytest.approx(0.5)


LLAMA_CPP_LOGIT_TOL = 0.05  # measured below: llama.cpp rounds activations to 8 bits for Q4_0/
# Q8_0 matmuls; the largest |logit difference| seen was well under this (README, GGUF)


def _llama_cpp():
    """llama_cpp with llama.cpp's extra buffer types (weight repacking) off: on CPUs with AMX
    they crash on Q4_0 and Q8_0 matrices; llama-cpp-python does not expose the option."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the [llamacpp] extra is not installed")
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    return llama_cpp


@pytest.fixture(scope="module")
def trained_4bit(tmp_path_factory, cache_dir):
    """A run that has learnt something (its greedy text is not a tie-break), 4-bit QAT."""
    from qat_jax import train

    config = small_config(cache_dir, **{"quant.bits": 4.0, "qat.fraction_policy": "fixed",
                                        "qat.fraction": 0.3, "quant.quantize_embedding": True,
                                        "schedule.total_tokens": 8 * 32 * 150,
                                        "checkpoint.every_steps": 150})
    workdir = tmp_path_factory.mktemp("gguf") / "run"
    train.train(config, workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="the [llamacpp] extra is not installed")  # before the fixture trains
def test_llama_cpp_runs_the_export_as_we_do(trained_4bit, tmp_path):
    from qat_jax import evaluate, generate

    llama_cpp = _llama_cpp()
    out = tmp_path / "m.gguf"
    evaluate.export_gguf(str(trained_4bit), str(out))
    served = generate.from_workdir(str(trained_4bit))
    sp = generate.tokenizer_of(served.config, None)
    prompt = sp.encode("And God said, Let there be light")
    llm = llama_cpp.Llama(str(out), n_ctx=served.config.model.seq_len, logits_all=True,
                          verbose=False, n_threads=2)
    assert llm.tokenize(b"And God said, Let there be light", add_bos=False) == prompt
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[:len(prompt)], np.float32)
    ours = np.asarray(served.net.apply({"params": served.params},
                                       jnp.asarray([prompt], jnp.int32)))[0]
    assert np.mean(np.argmax(theirs, -1) == np.argmax(ours, -1)) == 1.0
    assert np.max(np.abs(theirs - ours)) < LLAMA_CPP_LOGIT_TOL, np.max(np.abs(theirs - ours))
    # greedy text: 20 tokens, the same
    n = min(20, served.config.model.seq_len - len(prompt))
    mine = generate.generate(served, [prompt], generate.Sampling(n, 0.0, 1.0, 0),
                             sp.eos_id())[0]
    llm.reset()
    text = llm.create_completion(sp.decode(prompt), max_tokens=n, temperature=0.0,
                                 top_k=1)["choices"][0]["text"]
    assert text == sp.decode(prompt + list(mine))[len(sp.decode(prompt)):]
