"""Attention implementations, remat policies, the chunked cross-entropy and the platform-driven
'auto' choices (qat_jax/attention.py, qat_jax/model.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python, small_config

from qat_jax import attention, model, resolve, runconfig, trainstep


def _qkv(B=2, L=256, H=4, K=2, E=32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, L, H, E)), jax.random.normal(ks[1], (B, L, K, E)),
            jax.random.normal(ks[2], (B, L, K, E)))


def _attend(implementation, q, k, v, block=128):
    """[B, L, H, E] in and out; splash takes and gives the heads-first [B, H, L, E]."""
    if implementation != "splash":
        return attention.causal_attention(q, k, v, implementation=implementation,
                                          block_size=block, platform="cpu",
                                          axes=(model.BATCH, model.SEQ, model.Q_HEADS, None))
    out = attention.causal_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)),
                                     implementation="splash", block_size=block, platform="cpu",
                                     axes=(model.BATCH, model.Q_HEADS, model.SEQ, None))
    return jnp.swapaxes(out, 1, 2)


@pytest.mark.parametrize("platform,dtype,want", [
    ("tpu", jnp.bfloat16, "splash"), ("tpu", jnp.float32, "splash"),
    ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float32, "xla"), ("cpu", jnp.bfloat16, "xla"),
    ("cpu", jnp.float32, "xla")])
def test_auto_picks_by_platform(platform, dtype, want):
    assert attention.resolve("auto", platform, dtype) == want


@pytest.mark.parametrize("name,platform,dtype,match", [
    ("cudnn", "cpu", jnp.bfloat16, "needs an NVIDIA GPU"),
    ("cudnn", "gpu", jnp.float32, "16-bit compute"),
    ("splash", "gpu", jnp.bfloat16, "TPU kernel"),
    ("flash", "tpu", jnp.bfloat16, "valid")])
def test_unrunnable_choice_is_refused(name, platform, dtype, match):
    with pytest.raises(ValueError, match=match):
        attention.resolve(name, platform, dtype)


def test_splash_matches_xla_forward_and_backward():
    """The splash kernel (Pallas, interpreted on CPU) against XLA's softmax attention, grouped
    query heads, two 128-blocks per sequence so that the causal block skipping is exercised."""
    q, k, v = _qkv()
    np.testing.assert_allclose(_attend("splash", q, k, v), _attend("xla", q, k, v), atol=2e-5)
    loss = lambda impl, *a: jnp.sum(jnp.sin(_attend(impl, *a)))
    g_splash = jax.grad(functools.partial(loss, "splash"), argnums=(0, 1, 2))(q, k, v)
    g_xla = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_splash, g_xla, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()))
    # and it is causal: the first half of the output ignores the second half of k and v
    k2, v2 = k.at[:, 128:].set(0.0), v.at[:, 128:].set(7.0)
    np.testing.assert_array_equal(_attend("splash", q, k, v)[:, :128],
                                  _attend("splash", q, k2, v2)[:, :128])


SPLASH_SHARDED = """
import jax, numpy as np
from conftest import one_and_sharded, small_config
from qat_jax import resolve, sharding, trainstep
out = {}
tokens = np.random.default_rng(0).integers(0, 512, (8, 129)).astype(np.int32)
for name, mesh_keys, devices in one_and_sharded():
    config = small_config("CACHE", **mesh_keys, **{"model.seq_len": 128, **OVERRIDES})
    mesh = sharding.make_mesh(resolve.mesh_spec(config), devices)
    setup = trainstep.Setup.create(resolve.planned(config), mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        state = setup.init(jax.random.key(0))
        state, m = setup.fp.step(state, sharding.shard_batch(tokens, mesh))
        text = setup.fp.step.lower(state, sharding.shard_batch(tokens, mesh)).as_text()
    out[name] = (float(m["loss"]), jax.device_get(state.params), text)
if OVERRIDES.get("model.attention") == "splash":
    assert "shard_map" in out["sharded"][2] or "sdy.manual_computation" in out["sharded"][2]
np.testing.assert_allclose(out["one"][0], out["sharded"][0], rtol=1e-5)
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
    jax.tree.leaves(out["one"][1]), jax.tree.leaves(out["sharded"][1])))
assert diff < 3e-4, diff
print("sharded ok", out["one"][0], diff)
"""


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{"model.attention": "splash"},
                                       {"model.scan_layers": True}])
def test_step_sharded_matches_one_device(cache_dir, overrides):
    """A train step with splash attention inside shard_map, or with the layers under nn.scan,
    on data 2 x fsdp 2 x tensor 2 CPU devices equals the one-device step."""
    code = SPLASH_SHARDED.replace("CACHE", cache_dir).replace("OVERRIDES", repr(overrides))
    out = run_python("import sys; sys.path.insert(0, 'tests')\n" + code, n_devices=8)
    assert "sharded ok" in out


def _loss_and_grads(config, tokens, **overrides):
    net = model.Decoder(model.ModelConfig.from_config(config, **overrides))
    params = nn.unbox(net.init(jax.random.key(0), tokens[:, :-1])["params"])
    fn = jax.jit(jax.value_and_grad(functools.partial(trainstep.loss_fn, net=net)))
    return fn(params, tokens)


def _tokens(config, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, config.model.vocab_size,
                                    (config.data.batch_size, config.model.seq_len + 1)))


@pytest.mark.parametrize("policy", [p for p in model.REMAT_POLICIES if p != "none"])
def test_remat_policies_change_nothing_but_memory(tmp_path, policy):
    config = small_config(str(tmp_path))
    tokens = _tokens(config)
    loss0, g0 = _loss_and_grads(config, tokens)
    loss1, g1 = _loss_and_grads(config, tokens, remat_policy=policy)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def _saved_bytes(config, **overrides):
    """Bytes the backward pass keeps from the forward: the arrays held by jax.vjp's function
    (the residuals). XLA's CPU memory_analysis hardly moves with remat, so the policies are
    checked on what they decide, the residuals."""
    net = model.Decoder(model.ModelConfig.from_config(config, **overrides))
    B, L = config.data.batch_size, config.model.seq_len
    params = nn.unbox(net.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"])
    tokens = jnp.zeros((B, L + 1), jnp.int32)
    _, vjp = jax.vjp(functools.partial(trainstep.loss_fn, tokens_BL1=tokens, net=net), params)
    return sum(x.nbytes for x in jax.tree.leaves(vjp))


def test_remat_policies_and_chunked_loss_keep_less(tmp_path):
    """What the policies are for: each keeps less for the backward than the one before it, and
    the chunked cross-entropy keeps no [B, L, V] float32 logits (XLA's forms: GPU and TPU);
    nor does the CPU kernels' (kernels.cross_entropy: its gradients are computed in the
    forward pass), chunked or not."""
    config = small_config(str(tmp_path), **{"model.seq_len": 256, "model.n_layers": 4})
    kept = {p: _saved_bytes(config, remat_policy=p) for p in (
        "none", "dots", "dots_no_batch", "qkv_attn_mlp_out", "attn_mlp_out", "full")}
    values = list(kept.values())
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), kept
    assert kept["full"] < 0.1 * kept["none"], kept  # measured: 8.6 MB of 166 MB
    config = small_config(str(tmp_path), **{"model.vocab_size": 4096, "model.seq_len": 256,
                                            "model.n_layers": 1})
    logits_bytes = config.data.batch_size * config.model.seq_len * config.model.vocab_size * 4
    none, chunked = (_saved_bytes(config, kernel_operands=""),
                     _saved_bytes(config, kernel_operands="", loss_chunk_len=32))
    assert chunked < none - logits_bytes, (chunked, none, logits_bytes)
    cpu = _saved_bytes(config)
    assert model.ModelConfig.from_config(config).kernel_operands == "float32"
    assert cpu < none - logits_bytes, (cpu, none, logits_bytes)


@pytest.mark.parametrize("bits", [None, 4.0])
def test_chunked_cross_entropy_equals_full(tmp_path, bits):
    config = small_config(str(tmp_path), **{"quant.bits": bits,
                                            "quant.quantize_embedding": bits is not None})
    tokens = _tokens(config, seed=1)
    loss0, g0 = _loss_and_grads(config, tokens)
    for chunk in (8, 16):
        loss1, g1 = _loss_and_grads(config, tokens, loss_chunk_len=chunk)
        np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def test_loss_is_the_mean_cross_entropy_of_the_logits(tmp_path):
    config = small_config(str(tmp_path))
    tokens = _tokens(config)
    net = model.Decoder(model.ModelConfig.from_config(config))
    params = nn.unbox(net.init(jax.random.key(0), tokens[:, :-1])["params"])
    logits = net.apply({"params": params}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    want = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
    np.testing.assert_allclose(trainstep.loss_fn(params, tokens, net=net), want, rtol=1e-6)


@pytest.mark.parametrize("platform,dtype,attn", [
    ("cpu", jnp.float32, "xla"), ("tpu", jnp.bfloat16, "splash"), ("gpu", jnp.bfloat16, "cudnn")])
def test_auto_follows_the_target_not_the_host(tmp_path, platform, dtype, attn):
    """This host is a CPU; a model built for TPU or GPU gets bf16 and that platform's kernel."""
    cfg = model.ModelConfig.from_config(small_config(str(tmp_path)), platform)
    assert (cfg.dtype, cfg.attention, cfg.platform) == (dtype, attn, platform)


@pytest.mark.parametrize("overrides,match", [
    ({"model.attention": "flash"}, r"model.attention='flash'"),
    ({"model.attention_block": 100}, r"model.attention_block=100"),
    ({"model.remat_policy": "some"}, r"model.remat_policy='some'"),
    ({"model.loss_chunk_len": 7}, r"model.loss_chunk_len=7 .* divide model.seq_len=32"),
    ({"compile.cache_min_compile_s": -1.0}, r"compile.cache_min_compile_s=-1.0")])
def test_bad_keys_are_named(tmp_path, overrides, match):
    config = small_config(str(tmp_path))
    with config.unlocked():
        for key, value in overrides.items():
            group, name = key.split(".")
            setattr(getattr(config, group), name, value)
    with pytest.raises(resolve.ConfigError, match=match):
        resolve.resolve(config, n_devices=1, n_processes=1)


def test_splash_needs_whole_blocks(tmp_path):
    config = small_config(str(tmp_path), **{"model.seq_len": 384, "model.attention": "splash",
                                            "model.attention_block": 256})
    with pytest.raises(ValueError, match="seq_len=384 is not a multiple"):
        model.ModelConfig.from_config(config, "tpu")


@pytest.mark.parametrize("bits", [None, 4.0])
def test_cpu_kernels_change_float32_rounding_only(tmp_path, bits):
    """model.cpu_kernels (the default): a float32 model on CPU runs kernels.py's forms with
    float32 operands; its loss and gradients are XLA's own forms' (cpu_kernels=false) to float32
    rounding. bfloat16 operands take the kernels' forms either way; other platforms never."""
    config = small_config(str(tmp_path), **{"quant.bits": bits})
    assert model.ModelConfig.from_config(config).kernel_operands == "float32"
    off = runconfig.config_with(config, **{"model.cpu_kernels": False})
    assert model.ModelConfig.from_config(off).kernel_operands == ""
    assert model.ModelConfig.from_config(off).dot_general is jax.lax.dot_general
    bf16 = runconfig.config_with(off, **{"model.matmul_precision": "bfloat16"})
    assert model.ModelConfig.from_config(bf16).kernel_operands == "bfloat16"
    assert model.ModelConfig.from_config(config, platform="gpu").kernel_operands == ""
    tokens = _tokens(config)
    loss0, g0 = _loss_and_grads(off, tokens)
    loss1, g1 = _loss_and_grads(config, tokens)
    assert loss1 != loss0 or any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True))  # another path, really
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
