"""Hugging Face Llama directories: import, export, round trips, errors; and, where transformers
is installed (the `[hf]` extra), our logits against transformers' own Llama."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_FLAGS, fixed_fraction, overrides_to_flags, run_cli, small_config
from safetensors.numpy import load_file, save_file

from qat_jax import model, qparams, quant, resolve, runconfig, sizes, train
from qat_jax.errors import ConfigError
from qat_jax.tools import hf


def _params(config, seed=0):
    """A random model's parameters, its scales set from its weights when it quantizes."""
    params = jax.device_get(nn.unbox(model.Decoder(model.ModelConfig.from_config(config)).init(
        jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]))
    if config.quant.bits is None:
        return params
    return jax.device_get(qparams.init_scales(params, quant.QuantConfig.from_config(config)))


def _flat(tree):
    return {"/".join(p.key for p in path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _codes(params, config):
    q = quant.QuantConfig.from_config(config)
    return {m.weight_path: quant.to_codes(np.asarray(m.w_IO), np.asarray(m.alpha), m.quantizer,
                                          m.group) for m in qparams.quantized_pairs(params, q)}


def test_full_precision_round_trip_is_bit_exact(tmp_path):
    config = small_config(str(tmp_path))
    params = _params(config)
    hf.export(params, *sizes.specs(config), tmp_path / "a", quantized=False)
    back = hf.load_params(tmp_path / "a", *sizes.specs(config))
    a, b = _flat(params), _flat(back)
    assert a.keys() == b.keys()
    for k in a:
        if "quant_scale" not in k:  # a full-precision export has no scales: they come back 1
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["hidden_size"] == 64
    # bfloat16 weights (as most published checkpoints hold them) read as float32
    hf.export(params, *sizes.specs(config), tmp_path / "bf16", quantized=False, dtype="bfloat16")
    rounded = _flat(hf.load_params(tmp_path / "bf16", *sizes.specs(config)))
    for k in a:
        if "quant_scale" not in k:
            want = np.asarray(jnp.asarray(a[k]).astype(jnp.bfloat16).astype(jnp.float32))
            np.testing.assert_array_equal(rounded[k], want, err_msg=k)


@pytest.mark.parametrize("bits,embedding,granularity,group,tied", [
    (2.0, True, "channel", 0, True), (1.58, False, "group", 16, True),
    (4.0, True, "tensor", 0, True), (2.0, True, "channel", 0, False)])
def test_quantized_round_trip_keeps_the_codes(tmp_path, bits, embedding, granularity, group,
                                              tied):
    """export -> import -> export -> import: weights bit-exact after the first import, and the
    integer codes those weights and their stored scales give are the original model's."""
    config = small_config(str(tmp_path), **{
        "quant.bits": bits, "quant.quantize_embedding": embedding,
        "quant.granularity": granularity, "quant.group_size": group,
        "model.tie_embeddings": tied})
    params = _params(config)
    hf.export(params, *sizes.specs(config), tmp_path / "1", quantized=True)
    once = hf.load_params(tmp_path / "1", *sizes.specs(config))
    hf.export(once, *sizes.specs(config), tmp_path / "2", quantized=True)
    twice = hf.load_params(tmp_path / "2", *sizes.specs(config))
    for k, v in _flat(once).items():
        np.testing.assert_array_equal(v, _flat(twice)[k], err_msg=k)
    want, got = _codes(params, config), _codes(once, config)
    assert want.keys() == got.keys() and len(want) == 7 * 2 + int(embedding) * (2 - tied)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=str(k))
    other = runconfig.config_with(config, **{
        "quant.granularity": "group" if granularity != "group" else "channel",
        "quant.group_size": 16})
    with pytest.raises(ConfigError, match=r"the scales of model\.layers\.0\..* have shape"):
        hf.load_params(tmp_path / "1", *sizes.specs(other))
    saved = json.loads((tmp_path / "1" / "config.json").read_text())["qat_jax"]
    assert (saved["bits"], saved["granularity"], saved["scales"]) == (
        bits, granularity, "qat_jax_scales.safetensors")
    # the imported weights run as the quantized model does
    tokens = np.arange(32)[None] % 512
    qat = model.Decoder(model.ModelConfig.from_config(config))
    fp = model.Decoder(model.ModelConfig.from_config(small_config(str(tmp_path), **{
        "quant.granularity": granularity, "quant.group_size": group,
        "model.tie_embeddings": tied})))
    np.testing.assert_allclose(np.asarray(fp.apply({"params": once}, tokens)),
                               np.asarray(qat.apply({"params": params}, tokens)), atol=1e-5)


def test_sharded_checkpoint_reads_as_one(tmp_path):
    config = small_config(str(tmp_path))
    hf.export(_params(config), *sizes.specs(config), tmp_path / "one", quantized=False)
    tensors = load_file(str(tmp_path / "one" / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (sharded / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    specs = sizes.specs(config)
    a, b = (_flat(hf.load_params(d, *specs)) for d in (tmp_path / "one", sharded))
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2"}, r"qat_jax runs Llama"),
    ({"tie_word_embeddings": False}, r"run with --config.model.tie_embeddings=False"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling="),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"hidden_size": 128, "head_dim": 32},
     r"the checkpoint's shapes differ from the config \(model.d_model=64\); run with "
     r"--config.model.d_model=128"),
    ({"num_key_value_heads": 4, "num_hidden_layers": 3},
     r"run with --config.model.n_layers=3 --config.model.n_kv_heads=4"),
])
def test_unsupported_or_mismatched_checkpoints_are_named(tmp_path, change, match):
    config = small_config(str(tmp_path))
    hf.export(_params(config), *sizes.specs(config), tmp_path / "m", quantized=False)
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ConfigError, match=match):
        hf.load_params(tmp_path / "m", *sizes.specs(config))


def test_missing_or_misshapen_tensors_are_named(tmp_path):
    config = small_config(str(tmp_path))
    hf.export(_params(config), *sizes.specs(config), tmp_path / "m", quantized=False)
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((128, 32), np.float32)
    del tensors["model.norm.weight"]
    save_file(tensors, str(file))
    with pytest.raises(ConfigError, match=r"tensor model.norm.weight is missing"):
        hf.load_params(tmp_path / "m", *sizes.specs(config))
    with pytest.raises(ConfigError, match=r"no config.json"):
        hf.load_params(tmp_path, *sizes.specs(config))
    tensors["model.norm.weight"] = np.ones(64, np.float32)
    save_file(tensors, str(file))
    with pytest.raises(ConfigError, match=r"model.layers.1.mlp.up_proj.weight has shape "
                                          r"\(128, 32\), the config needs \(128, 64\)"):
        hf.load_params(tmp_path / "m", *sizes.specs(config))


@pytest.mark.parametrize("damage", ["truncated_weights", "not_safetensors", "scales_cut",
                                    "index_without_map"])
def test_damaged_checkpoint_files_are_named(tmp_path, damage):
    """An interrupted download or copy of any file of the checkpoint is an error naming that
    file, never a traceback from safetensors."""
    config = small_config(str(tmp_path), **{"quant.bits": 2.0})
    hf.export(_params(config), *sizes.specs(config), tmp_path / "m", quantized=True)
    weights, scales = tmp_path / "m" / "model.safetensors", tmp_path / "m" / hf.SCALES_FILE
    if damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        bad = weights
    elif damage == "not_safetensors":
        weights.write_text("<html>404</html>")
        bad = weights
    elif damage == "scales_cut":
        scales.write_bytes(scales.read_bytes()[:7])
        bad = scales
    else:
        (tmp_path / "m" / "model.safetensors.index.json").write_text('{"metadata": {}}')
        bad = tmp_path / "m" / "model.safetensors.index.json"
    with pytest.raises(ConfigError, match=str(bad)) as e:
        hf.load_params(tmp_path / "m", *sizes.specs(config))
    assert "again" in str(e.value)


@pytest.mark.slow
def test_a_run_continues_from_an_export(tmp_path, cache_dir):
    """A run exported in the Hugging Face layout starts another (--init_from): at step 0 that
    run's model is the first one's, with its tokenizer; and QAT can start straight from it."""
    from qat_jax.tools import evaluate, export

    config = small_config(cache_dir)
    first = train.train(resolve.resolve(config), tmp_path / "a")
    export.export_hf(str(tmp_path / "a"), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    keys = {"model.init_from": str(tmp_path / "hf"),
            "data.tokenizer": str(tmp_path / "hf" / "tokenizer.model")}
    second = runconfig.config_with(config, **keys)
    assert train.train(resolve.resolve(second), tmp_path / "b",
                       train.Segment(stop_at=0)) == {"stopped_at": 0}
    start = evaluate.evaluate_workdir(str(tmp_path / "b"))
    assert start["step"] == 0 and math.isclose(start["val_loss"], first["val_loss"],
                                               rel_tol=1e-6)
    # From the command line: --init_from brings the tokenizer; QAT from step 0
    flags = [f"--config.data.cache_dir={cache_dir}", f"--init_from={tmp_path / 'hf'}",
             *overrides_to_flags(SMALL_FLAGS)]
    run_cli(["train", f"--workdir={tmp_path / 'c'}", "--config.quant.bits=4",
             *overrides_to_flags(fixed_fraction(1.0)), *flags])
    result = json.loads((tmp_path / "c" / "result.json").read_text())
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert result["bits"] == 4.0 and result["val_loss"] < first["val_loss"] + 0.5
    assert saved["data"]["tokenizer"] == str(tmp_path / "hf" / "tokenizer.model")
    bad = run_cli(["train", f"--workdir={tmp_path / 'd'}", *flags, "--config.model.d_ff=256"],
                  check=False)
    assert bad.returncode == 1 and "run with --config.model.d_ff=128" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "d" / "config.json").exists()


def test_hf_export_flag_and_errors(tmp_path):
    config = small_config(str(tmp_path))
    hf.export(_params(config), *sizes.specs(config), tmp_path / "m", quantized=False)
    with pytest.raises(FileExistsError, match="exists; nothing is overwritten"):
        hf.export(_params(config), *sizes.specs(config), tmp_path / "m", quantized=False)
    bad = runconfig.config_with(config, **{"model.init_from": str(tmp_path / "m"),
                                          "model.d_ff": 256})
    with pytest.raises(ConfigError, match=r"--config.model.d_ff=128"):
        train.train(resolve.resolve(bad), tmp_path / "run")  # before anything is loaded or written
    assert not (tmp_path / "run" / "config.json").exists()


# --------------------------------------------------------------- against transformers ([hf])


def _tiny_llama(tmp_path, tied=True):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
        initializer_range=0.1)
    net = transformers.LlamaForCausalLM(cfg).eval()
    net.save_pretrained(tmp_path / "llama", safe_serialization=True)
    return torch, transformers, net


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_transformers_after_import_and_export(tmp_path, tied):
    torch, transformers, theirs = _tiny_llama(tmp_path, tied)
    config = small_config(str(tmp_path))
    config = runconfig.config_with(config, **hf.config_overrides(
        hf.read_config(tmp_path / "llama")))
    params = hf.load_params(tmp_path / "llama", *sizes.specs(config))
    ours = model.Decoder(model.ModelConfig.from_config(config))
    tokens = np.random.default_rng(0).integers(0, 512, (2, 32))
    with torch.no_grad():
        want = theirs(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(ours.apply({"params": params}, tokens))
    after_import = float(np.abs(got - want).max())
    hf.export(params, *sizes.specs(config), tmp_path / "ours", quantized=False)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = reloaded(torch.tensor(tokens)).logits.numpy()
    after_export = float(np.abs(again - want).max())
    # A 2-bit model of the same weights: transformers runs the export as our QAT model
    qat_config = runconfig.config_with(config, **{"quant.bits": 2.0})
    qat_params = jax.device_get(qparams.init_scales(params, quant.QuantConfig.from_config(
        qat_config)))
    hf.export(qat_params, *sizes.specs(qat_config), tmp_path / "ours2", quantized=True)
    served = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours2").eval()
    with torch.no_grad():
        theirs_2bit = served(torch.tensor(tokens)).logits.numpy()
    ours_2bit = np.asarray(model.Decoder(model.ModelConfig.from_config(qat_config)).apply(
        {"params": qat_params}, tokens))
    quantized = float(np.abs(theirs_2bit - ours_2bit).max())
    print(f"{'tied' if tied else 'untied'} head: max |logit difference|: after import "
          f"{after_import:.3g}, after export and reload {after_export:.3g}, 2-bit export in "
          f"transformers vs our QAT model {quantized:.3g} (logits up to {np.abs(want).max():.3g})")
    assert after_import < 1e-4 and after_export < 1e-4 and quantized < 1e-4
    assert np.abs(want).max() > 0.5 and np.abs(ours_2bit - got).max() > 1e-2
