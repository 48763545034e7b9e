"""Export of real packed low-bit weights: exact parity with the fake-quantized model."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from qat_jax import model, qparams, quant, resolve, sizes, trainstep
from qat_jax.tools import packed


def _qat_params(tmp_path, bits, quantize_embedding=False, tied=True):
    config = small_config(str(tmp_path), **{"quant.bits": bits,
                                            "quant.quantize_embedding": quantize_embedding,
                                            "model.tie_embeddings": tied})
    net = model.Decoder(model.ModelConfig.from_config(config))
    params = nn.unbox(net.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"])
    params = qparams.init_scales(params, quant.QuantConfig.from_config(config))
    # Shrink the scales a little so clipping is part of what the export must reproduce.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 0.8 if "quant_scale" in p[-1].key else x, params)
    return config, net, params


def _to_bf16(params, config):
    """`params` as a served model holds them: every unquantized tensor rounded to bfloat16."""
    kept = {m.weight_path for m in qparams.quantized_pairs(params,
                                                        quant.QuantConfig.from_config(config))}
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if tuple(k.key for k in p) in kept or "quant_scale" in p[-1].key
        else x.astype(jnp.bfloat16).astype(jnp.float32), params)


@pytest.mark.parametrize("bits,quantize_embedding,tied", [
    *((b, e, True) for b in quant.BITS for e in (False, True)),
    (2, True, False), (4, False, False)])
def test_export_reproduces_fake_quant_forward(tmp_path, bits, quantize_embedding, tied):
    """(An untied head is quantized with the embedding, at max(B, 4) bits.)"""
    config, net, params = _qat_params(tmp_path, float(bits), quantize_embedding, tied)
    fp_net = model.Decoder(model.ModelConfig.from_config(small_config(
        str(tmp_path), **{"model.tie_embeddings": tied})))
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, 512)
    for dtype, served in (("float32", params), ("bfloat16", _to_bf16(params, config))):
        out = tmp_path / f"model-{dtype}.safetensors"
        written = packed.export_params(params, resolve.resolve(config), out, dtype)
        saved_config, loaded = packed.load(out)
        assert saved_config["quant"]["bits"] == float(bits)
        assert jax.tree.structure(loaded) == jax.tree.structure(jax.device_get(params))
        want = net.apply({"params": served}, tokens[:, :-1])
        got = fp_net.apply({"params": loaded}, tokens[:, :-1])
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-5
        assert float(trainstep.loss_fn(loaded, tokens, net=fp_net)) == pytest.approx(
            float(trainstep.loss_fn(served, tokens, net=net)), abs=1e-6)
    # bf16: the tensors are exactly the served model's bytes (the rule S and the planner use).
    assert written["tensor_bytes"] == sizes.served_bytes(*sizes.specs(config), float(bits))["total"]
    assert written["bf16_model_bytes"] == sizes.served_bytes(*sizes.specs(config))["total"]
    # Packed size: B/16 of the same matrices in bf16 (ternary: 1.6/16).
    n_matrices = 7 * config.model.n_layers + int(quantize_embedding) * (1 if tied else 2)
    assert written["quantized_matrices"] == n_matrices
    q = quant.QuantConfig.from_config(config)
    pairs = qparams.quantized_pairs(params, q)
    assert written["quantized_bytes"] == sum(math.ceil(np.size(m.w_IO) * m.quantizer.packed_bits
                                                     / 8) for m in pairs)
    if not quantize_embedding:  # (the embedding is stored at max(B, 4) bits)
        ratio = written["quantized_bytes"] / written["quantized_bf16_bytes"]
        assert ratio == pytest.approx(quant.quantizer(bits).packed_bits / 16, rel=0.01)
    assert written["file_bytes"] < written["bf16_model_bytes"]


def test_served_bytes_rule(tmp_path):
    """The rule written out for one config: 2 layers of 7 matrices at B bits plus float32
    scales per output channel; bf16 norms and (unless quantized) embedding."""
    config = small_config(str(tmp_path))  # D 64, d_ff 128, 4 heads / 2 kv heads of 16, V 512
    mats = 2 * [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    weights, channels = sum(i * o for i, o in mats), sum(o for _, o in mats)
    norms = (2 * 2 + 1) * 64
    assert sizes.served_bytes(*sizes.specs(config)) == {"quantized": 0, "scales": 0, "other": 2 * (
        weights + 512 * 64 + norms), "total": 2 * (weights + 512 * 64 + norms)}
    got = sizes.served_bytes(*sizes.specs(config), 2.0)
    assert got == {"quantized": weights * 2 // 8, "scales": 4 * channels,
                   "other": 2 * (norms + 512 * 64), "total": got["total"]}
    config.quant.quantize_embedding = True
    got = sizes.served_bytes(*sizes.specs(config), 2.0)  # the embedding at max(2, 4) = 4 bits
    assert got["quantized"] == weights * 2 // 8 + 512 * 64 * 4 // 8
    assert got["scales"] == 4 * (channels + 512) and got["other"] == 2 * norms


def test_export_refuses_overwrite_and_fp(tmp_path):
    config, _, params = _qat_params(tmp_path, 4.0)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        packed.export_params(params, resolve.resolve(config), out)
    assert out.read_bytes() == b"keep me"
    fp = small_config(str(tmp_path))
    with pytest.raises(ValueError, match="full-precision run has no quantized model"):
        packed.export_params(params, resolve.resolve(fp), tmp_path / "fp.safetensors")


def test_load_rejects_other_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a qat_jax export"):
        packed.load(tmp_path / "other.safetensors")
