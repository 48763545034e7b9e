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

from qat_jax import data, model, qparams, quant, resolve, runconfig, sizes
from qat_jax.tools import gguf_export, hf

# Its module-scoped fixtures are built once: its tests run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("gguf")

gguf = pytest.importorskip("gguf")


def _params(config, seed=0, fp16_scales=True):
    """A random model's parameters with its scales set from its weights; with `fp16_scales`
    each scale is an fp16 number (as the fp16-scale training setting makes them)."""
    params = jax.device_get(nn.unbox(model.Decoder(model.ModelConfig.from_config(config)).init(
        jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]))
    params = jax.device_get(qparams.init_scales(params, quant.QuantConfig.from_config(config)))
    if not fp16_scales:
        return params
    flat = traverse_util.flatten_dict(params)
    flat = {k: (np.asarray(v, np.float16).astype(np.float32) if "quant_scale" in k[-1] else v)
            for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat)


def _config(cache_dir, bits, **keys):
    """The small model; at the bit widths of 256-weight blocks, d_model and d_ff widened to
    rows of 256."""
    wide = {} if gguf_export.TYPES[bits].block == 32 else {"model.d_model": 256,
                                                           "model.d_ff": 512}
    return small_config(cache_dir, **{"quant.bits": float(bits),
                                      "quant.quantize_embedding": True, **wide, **keys})


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
        qparams.served_params(params, quant.QuantConfig.from_config(config)), sep="/")
    return {k: np.asarray(v, np.float32).T if k.endswith("/kernel") else np.asarray(v)
            for k, v in flat.items()}


@pytest.mark.parametrize("bits,kind,granularity,group", [
    (8, "Q8_0", "channel", 0), (6, "Q6_K", "channel", 0), (5, "Q5_0", "channel", 0),
    (4, "Q4_0", "channel", 0), (3, "Q3_K", "channel", 0), (2, "Q2_K", "channel", 0),
    (1.58, "TQ2_0", "channel", 0), (1, "TQ2_0", "channel", 0),
    (4, "Q4_0", "tensor", 0), (4, "Q4_0", "group", 32), (8, "Q8_0", "group", 64),
    (2, "Q2_K", "group", 256)])
def test_every_bit_width_is_the_served_model_in_its_type(tmp_path, cache_dir, bits, kind,
                                                         granularity, group):
    """Bit for bit where the scales are fp16 numbers; at 1.58 bits d = 2 alpha / 3 is rounded
    to fp16 (the codes exact), and the export reports that change."""
    config = _config(cache_dir, bits, **{"quant.granularity": granularity,
                                         "quant.group_size": group})
    params = _params(config)
    r = gguf_export.export(params, *sizes.specs(config), tmp_path / "m.gguf",
                           data.load_corpus(resolve.data_spec(config)).tokenizer_path)
    embed = gguf_export.TYPES[quant.embedding_bits(bits)].name  # the embedding: max(B, 4) bits
    n_layers = config.model.n_layers
    want = {kind: 7 * n_layers, "F32": 2 * n_layers + 1}
    want[embed] = want.get(embed, 0) + 1
    assert r["types"] == want
    _, read = _read(tmp_path / "m.gguf", config)
    served = _served(params, config)
    worst = 0.0
    for ours, (w, name) in read.items():
        assert name == ((embed if ours == "embed" else kind) if w.ndim == 2 else "F32"), ours
        if bits != 1.58 or ours == "embed" or w.ndim == 1:
            np.testing.assert_array_equal(w, served[ours], err_msg=ours)
        worst = max(worst, float(np.max(np.abs(w - served[ours]))))
    assert r["max_weight_change"] == worst
    if bits == 1.58:  # the fp16 rounding of 2 alpha / 3: a few parts in 10^4 of a weight
        assert 0 < worst <= 1e-3 * max(float(np.max(np.abs(v))) for v in served.values())


def test_scales_rounded_to_fp16_keep_the_codes_and_report_the_change(tmp_path, cache_dir):
    config = _config(cache_dir, 4)
    params = _params(config, fp16_scales=False)
    r = gguf_export.export(params, *sizes.specs(config), tmp_path / "m.gguf",
                           data.load_corpus(resolve.data_spec(config)).tokenizer_path)
    _, read = _read(tmp_path / "m.gguf", config)
    served = _served(params, config)
    worst = max(float(np.max(np.abs(w - served[k]))) for k, (w, _) in read.items())
    assert 0 < worst == pytest.approx(r["max_weight_change"], rel=1e-6)
    # the change is the scale's fp16 rounding only: each weight's level is ours
    q = quant.QuantConfig.from_config(config)
    for m in qparams.quantized_pairs(params, q):
        ours = "/".join(m.weight_path)
        alpha16 = np.asarray(m.alpha, np.float16).astype(np.float32)  # [1, O]
        levels = read[ours][0].T / alpha16  # [I, O], like w_IO
        codes = quant.to_codes(np.asarray(m.w_IO), np.asarray(m.alpha), m.quantizer)
        np.testing.assert_array_equal(levels, m.quantizer.from_codes(codes.astype(np.float32)))


@pytest.mark.parametrize("bits", [4, 1.58])
def test_fp16_scale_training_makes_the_export_exact(tmp_path, cache_dir, bits):
    """quant.scale_dtype=float16: the model quantizes with its scales rounded to fp16 (the
    gradient passing straight through), so the GGUF file is the served model bit for bit,
    whatever float32 scales training left; at 1.58 bits the rounded number is the block's
    d = 2 alpha / 3, and the file is the served model to float32's rounding of 2/3."""
    x = jnp.asarray([0.1234567, 3.3333333, 1e-3], jnp.float32)
    rounded = quant.stored_scale(x, "float16")
    np.testing.assert_array_equal(rounded, np.asarray(x, np.float16).astype(np.float32))
    assert not np.array_equal(rounded, x)
    grad = jax.grad(lambda a: jnp.sum(quant.stored_scale(a, "float16") * jnp.arange(3.0)))(x)
    np.testing.assert_array_equal(grad, [0.0, 1.0, 2.0])  # straight through
    assert quant.stored_scale(x, "float32") is x

    config = _config(cache_dir, bits, **{"quant.scale_dtype": "float16"})
    params = _params(config, fp16_scales=False)  # float32 scales, as training leaves them
    r = gguf_export.export(params, *sizes.specs(config), tmp_path / "m.gguf",
                           data.load_corpus(resolve.data_spec(config)).tokenizer_path)
    _, read = _read(tmp_path / "m.gguf", config)
    served = _served(params, config)
    if bits == 4:
        assert r["max_weight_change"] == 0.0
        for ours, (w, _) in read.items():
            np.testing.assert_array_equal(w, served[ours], err_msg=ours)
    else:
        for ours, (w, _) in read.items():
            np.testing.assert_allclose(w, served[ours], rtol=3e-7, atol=0, err_msg=ours)
    # and the served model is the one the model computes
    net = model.Decoder(model.ModelConfig.from_config(config))
    fp = model.Decoder(model.ModelConfig.from_config(
        runconfig.config_with(config, **{"quant.bits": None})))
    tokens = jnp.arange(16, dtype=jnp.int32)[None] % config.model.vocab_size
    served_tree = qparams.served_params(params, quant.QuantConfig.from_config(config))
    np.testing.assert_allclose(net.apply({"params": params}, tokens),
                               fp.apply({"params": served_tree}, tokens), atol=1e-5)


def test_file_size_is_llama_cpps_bits_per_weight(tmp_path, cache_dir):
    """llama.cpp's bits per weight of each type: Q4_0 4.5, Q5_0 5.5, Q8_0 8.5 (an fp16 scale
    per 32 codes), Q6_K 6.5625, Q3_K 3.4375, Q2_K 2.625, TQ2_0 2.0625."""
    bpw = {}
    for bits in gguf_export.TYPES:
        config = _config(cache_dir, bits)
        r = gguf_export.export(_params(config), *sizes.specs(config), tmp_path / f"{bits}.gguf",
                               data.load_corpus(resolve.data_spec(config)).tokenizer_path)
        reader = gguf.GGUFReader(str(tmp_path / f"{bits}.gguf"))
        kind = gguf_export.TYPES[bits].name
        quantized = [t for t in reader.tensors if t.tensor_type.name == kind]
        weights = sum(int(t.n_elements) for t in quantized)
        bpw[bits] = 8 * sum(int(t.n_bytes) for t in quantized) / weights
        assert r["bytes"] > sum(int(t.n_bytes) for t in reader.tensors)  # + metadata
    assert bpw == {8: 8.5, 6: 6.5625, 5: 5.5, 4: 4.5, 3: 3.4375, 2: 2.625, 1.58: 2.0625,
                   1: 2.0625}


@pytest.mark.parametrize("bits,keys,match", [
    (4, {"quant.granularity": "group", "quant.group_size": 16},
     "quant.group_size=16 scales cannot be the scales of Q4_0's 32-weight blocks (4 bits)"),
    (2, {"quant.granularity": "group", "quant.group_size": 128},
     "quant.group_size=128 scales cannot be the scales of Q2_K's 256-weight blocks"),
    (4, {"model.d_ff": 80}, "block_0/mlp/down/kernel has rows of 80 weights (its input "
                            "features), not a multiple of Q4_0's 32-weight block for 4 bits"),
    (3, {"model.d_model": 64}, "has rows of 64 weights (its input features), not a multiple "
                               "of Q3_K's 256-weight block for 3 bits"),
])
def test_what_does_not_map_is_refused_before_writing(tmp_path, cache_dir, bits, keys, match):
    config = _config(cache_dir, bits, **keys)
    with pytest.raises(gguf_export.GGUFExportError, match=re.escape(match)):
        gguf_export.export(_params(config), *sizes.specs(config), tmp_path / "m.gguf",
                           data.load_corpus(resolve.data_spec(config)).tokenizer_path)
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
    tokenizer = data.load_corpus(resolve.data_spec(config)).tokenizer_path
    gguf_export.export(_params(config), *sizes.specs(config), tmp_path / "m.gguf", tokenizer)
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


LLAMA_CPP_LOGIT_TOL = 0.05  # llama.cpp's CPU kernels round the activations to 8 bits for
# these blocks; the largest |logit difference| measured was 0.031 (README, llama.cpp's check)


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


@pytest.fixture(scope="module", params=[2, 4, 8])
def trained(request, tmp_path_factory, cache_dir):
    """A QAT run that has learnt something (its greedy text is not a tie-break), at 2, 4 and
    8 bits, with fp16 scales (the file is then our served model exactly)."""
    from qat_jax import train

    bits = request.param
    config = _config(cache_dir, bits, **{"qat.fraction_policy": "fixed", "qat.fraction": 0.3,
                                         "quant.scale_dtype": "float16",
                                         "schedule.total_tokens": 8 * 32 * 150,
                                         "checkpoint.every_steps": 150})
    workdir = tmp_path_factory.mktemp(f"gguf{bits}") / "run"
    train.train(resolve.resolve(config), workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="the [llamacpp] extra is not installed")  # before the fixture trains
def test_llama_cpp_runs_the_export_as_we_do(trained, tmp_path):
    from qat_jax.tools import export, generate

    llama_cpp = _llama_cpp()
    out = tmp_path / "m.gguf"
    written = export.export_gguf(str(trained), str(out))
    assert written["max_weight_change"] == 0.0
    served = generate.from_workdir(str(trained))
    sp = generate.tokenizer_of(served.data, None)
    text = "And God said, Let there be light"
    prompt = sp.encode(text)
    llm = llama_cpp.Llama(str(out), n_ctx=served.net.cfg.seq_len, logits_all=True,
                          verbose=False, n_threads=2)
    assert llm.tokenize(text.encode(), add_bos=False) == prompt  # tokenized as we do
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[:len(prompt)], np.float32)
    ours = np.asarray(served.net.apply({"params": served.params},
                                       jnp.asarray([prompt], jnp.int32)))[0]
    diff = float(np.max(np.abs(theirs - ours)))
    print(f"\n{written['bits']:g} bits: max |logit difference| {diff:.4g} (mean "
          f"{float(np.mean(np.abs(theirs - ours))):.2g}) on logits spanning "
          f"{float(ours.max() - ours.min()):.3g}")
    assert np.array_equal(np.argmax(theirs, -1), np.argmax(ours, -1))
    assert diff < LLAMA_CPP_LOGIT_TOL
    # greedy text, 20 tokens: the same, up to a near tie of our logits (two engines' float
    # rounding decides a tie within their logits' difference, and the texts part there)
    n = min(20, served.net.cfg.seq_len - len(prompt))
    mine = [int(t) for t in generate.generate(served, [prompt],
                                              generate.Sampling(n, 0.0, 1.0, 0), sp.eos_id())[0]]
    llm.reset()
    llm.eval(prompt)
    theirs_ids = []
    for _ in range(n):
        theirs_ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(theirs_ids[-1:])
    assert len(mine) == n
    parted = next((i for i in range(n) if mine[i] != theirs_ids[i]), n)
    if parted < n:
        logits = np.asarray(served.net.apply({"params": served.params}, jnp.asarray(
            [prompt + mine[:parted]], jnp.int32)))[0, -1]
        first, second = np.argsort(logits)[::-1][:2]
        assert (first, second) == (mine[parted], theirs_ids[parted])
        assert logits[first] - logits[second] < 2 * LLAMA_CPP_LOGIT_TOL
    # llama.cpp's own greedy completion is its tokens, decoded as we decode them
    llm.reset()
    completion = llm.create_completion(text, max_tokens=n, temperature=0.0,
                                       top_k=1)["choices"][0]["text"]
    assert completion == sp.decode(prompt + theirs_ids)[len(sp.decode(prompt)):]
