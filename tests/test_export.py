"""Export of real packed low-bit weights: exact parity with the fake-quantized model."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from qat_jax import export, model, quant, train


def _qat_params(tmp_path, bits, quantize_embedding=False):
    config = small_config(str(tmp_path), **{"quant.bits": bits,
                                            "quant.quantize_embedding": quantize_embedding})
    net = model.Decoder(model.ModelConfig.from_config(config))
    params = nn.unbox(net.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"])
    params = quant.init_scales(params, quant.QuantConfig.from_config(config))
    # Shrink the scales a little so clipping is part of what the export must reproduce.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 0.8 if "quant_scale" in p[-1].key else x, params)
    return config, net, params


@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("quantize_embedding", [False, True])
def test_export_reproduces_fake_quant_forward(tmp_path, bits, quantize_embedding):
    config, net, params = _qat_params(tmp_path, float(bits), quantize_embedding)
    sizes = export.export_params(params, config, tmp_path / "model.safetensors")
    saved_config, loaded = export.load(tmp_path / "model.safetensors")
    assert saved_config["quant"]["bits"] == float(bits)
    assert jax.tree.structure(loaded) == jax.tree.structure(jax.device_get(params))
    fp_net = model.Decoder(model.ModelConfig.from_config(small_config(str(tmp_path))))
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, 512)
    want = net.apply({"params": params}, tokens[:, :-1])
    got = fp_net.apply({"params": loaded}, tokens[:, :-1])
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-5
    assert float(train.loss_fn(loaded, tokens, net=fp_net)) == pytest.approx(
        float(train.loss_fn(params, tokens, net=net)), abs=1e-6)
    # Packed size: B/16 of the same matrices in bf16 (ternary: 1.6/16).
    n_matrices = 7 * config.model.n_layers + int(quantize_embedding)
    assert sizes["quantized_matrices"] == n_matrices
    q = quant.QuantConfig.from_config(config)
    pairs = quant.quantized_pairs(params, q)
    assert sizes["quantized_bytes"] == sum(math.ceil(np.size(m.w_IO) * quant.packed_bits(m.bits)
                                                     / 8) for m in pairs)
    if not quantize_embedding:  # (the embedding is stored at max(B, 4) bits)
        ratio = sizes["quantized_bytes"] / sizes["quantized_bf16_bytes"]
        assert ratio == pytest.approx(quant.packed_bits(bits) / 16, rel=0.01)
    assert sizes["file_bytes"] < sizes["bf16_model_bytes"] * (1.0 if quantize_embedding else 2.0)


def test_export_refuses_overwrite_and_fp(tmp_path):
    config, _, params = _qat_params(tmp_path, 4.0)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        export.export_params(params, config, out)
    assert out.read_bytes() == b"keep me"
    fp = small_config(str(tmp_path))
    with pytest.raises(ValueError, match="full-precision run has no quantized model"):
        export.export_params(params, fp, tmp_path / "fp.safetensors")


def test_load_rejects_other_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a qat_jax export"):
        export.load(tmp_path / "other.safetensors")
