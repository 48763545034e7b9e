import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from jax import lax

from qat_jax import layout, model, qparams, quant, resolve, rope, runconfig, sizes
from qat_jax.configs import paper, tiny


def _params(config, net=None):
    net = net or model.Decoder(model.ModelConfig.from_config(config))
    tokens = jnp.zeros((1, config.model.seq_len), jnp.int32)
    return net, nn.unbox(net.init(jax.random.key(0), tokens)["params"])


def _leaves(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def test_shapes_and_finite(tmp_path):
    config = small_config(str(tmp_path))
    net, params = _params(config)
    tokens = jax.random.randint(jax.random.key(1), (3, 32), 0, 512)
    logits = net.apply({"params": params}, tokens)
    assert logits.shape == (3, 32, 512) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # An untrained model predicts roughly uniformly: loss near log(V).
    loss = -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    assert abs(float(loss) - math.log(512)) < 0.5


def test_causal_via_gradients(tmp_path):
    """d logits[t] / d input[s] is zero for every s > t and non-zero for s <= t."""
    config = small_config(str(tmp_path))
    net, params = _params(config)
    tokens = jax.random.randint(jax.random.key(2), (1, 32), 0, 512)
    t = 10

    def logits_at_t(offset_LD):
        x = jnp.take(params["embed"], tokens, axis=0) + offset_LD[None]
        return _forward_from_embeddings(net, params, x)[0, t].sum()

    g = jax.grad(logits_at_t)(jnp.zeros((32, 64)))
    norms = np.asarray(jnp.linalg.norm(g, axis=-1))
    assert np.all(norms[t + 1:] == 0.0)
    assert np.all(norms[:t + 1] > 0.0)


def _forward_from_embeddings(net, params, x_BLD):
    """The decoder after its embedding lookup (same modules, same parameters)."""
    cfg = net.cfg
    for i in range(cfg.n_layers):
        x_BLD = model.Block(cfg).apply({"params": params[f"block_{i}"]}, x_BLD)
    x_BLD = model.RMSNorm(cfg).apply({"params": params["final_norm"]}, x_BLD)
    return x_BLD @ params["embed"].T


def test_forward_from_embeddings_matches_model(tmp_path):
    # Guards the helper above: it must be the model itself.
    config = small_config(str(tmp_path))
    net, params = _params(config)
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, 512)
    ref = net.apply({"params": params}, tokens)
    got = _forward_from_embeddings(net, params, jnp.take(params["embed"], tokens, axis=0))
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"model.n_kv_heads": 1}, {"model.n_kv_heads": 4},
                                       {"model.tie_embeddings": False}])
def test_param_count_equals_leaves(tmp_path, overrides):
    config = small_config(str(tmp_path), **overrides)
    _, params = _params(config)
    counts = sizes.param_count(*sizes.specs(config))
    assert counts["total"] == _leaves(params)
    embedding = params["embed"].size + params["embed_quant_scale"].size
    assert counts["non_embedding"] == _leaves(params) - embedding
    scales = jax.tree_util.tree_leaves_with_path(params)
    n_scales = sum(x.size for path, x in scales if "quant_scale" in path[-1].key)
    assert counts["scales"] == n_scales


@pytest.mark.parametrize("granularity,group", [("tensor", 0), ("group", 16)])
def test_param_count_with_scale_granularity(tmp_path, granularity, group):
    config = small_config(str(tmp_path), **{"quant.granularity": granularity,
                                            "quant.group_size": group})
    _, params = _params(config)
    assert sizes.param_count(*sizes.specs(config))["total"] == _leaves(params)


def test_tiny_config_sizes():
    config = tiny.get_config()
    assert config.model.d_model >= 256 and config.model.n_layers >= 4
    shapes = jax.eval_shape(lambda: nn.unbox(model.Decoder(model.ModelConfig.from_config(
        config)).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
    assert sizes.param_count(*sizes.specs(config))["total"] == _leaves(shapes)


@pytest.mark.parametrize("size", list(paper.SIZES))
def test_paper_sizes_within_2_percent(size):
    config = paper.get_config(size)
    assert config.model.seq_len == 1024 and config.model.vocab_size == 32000
    counts = sizes.param_count(*sizes.specs(config))
    assert abs(counts["total"] - paper.NOMINAL[size]) / paper.NOMINAL[size] < 0.02
    if size == "86m":  # the analytic count is the leaf count at paper scale too
        net = model.Decoder(model.ModelConfig.from_config(config))
        shapes = jax.eval_shape(lambda: nn.unbox(
            net.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
        assert counts["total"] == _leaves(shapes)


def test_paper_sizes_increase():
    totals = [sizes.param_count(*sizes.specs(paper.get_config(s)))["total"] for s in paper.SIZES]
    assert totals == sorted(totals)


def test_rope_matches_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 6, 2, 8)).astype(np.float32)
    theta = 10000.0
    got = np.asarray(rope.rope(jnp.asarray(x), jnp.arange(6), theta))
    want = np.empty_like(x)
    E, half = 8, 4
    for pos in range(6):
        for i in range(half):
            a = pos * theta ** (-2 * i / E)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[0, pos, :, i], x[0, pos, :, i + half]
            want[0, pos, :, i] = x1 * c - x2 * s
            want[0, pos, :, i + half] = x1 * s + x2 * c
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Rotations preserve norms, and position 0 is the identity.
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(got[:, 0], x[:, 0], atol=1e-6)


def test_rope_relative():
    """q.k after RoPE depends only on the position difference."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(pq, pk):
        rq = rope.rope(jnp.broadcast_to(q, (1, 20, 1, 16)), jnp.arange(20), 10000.0)[0, pq, 0]
        rk = rope.rope(jnp.broadcast_to(k, (1, 20, 1, 16)), jnp.arange(20), 10000.0)[0, pk, 0]
        return float(rq @ rk)

    assert abs(score(5, 2) - score(15, 12)) < 1e-4
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_every_projection_goes_through_dot_general(tmp_path):
    """The injection point: a recording dot_general sees all 7 projections of every block."""
    config = small_config(str(tmp_path))
    seen = []

    def recording(x, w, dims, **kw):
        seen.append(w.shape)
        return lax.dot_general(x, w, dims, **kw)

    net = model.Decoder(model.ModelConfig.from_config(config, dot_general=recording))
    _, params = _params(config, net)
    seen.clear()
    net.apply({"params": params}, jnp.zeros((1, 32), jnp.int32))
    assert len(seen) == 7 * config.model.n_layers
    d, f, kv = 64, 128, 2 * 16
    assert sorted(set(seen)) == sorted({(d, d), (d, kv), (d, f), (f, d)})


def test_scaled_dot_general_changes_output(tmp_path):
    """Whatever dot_general returns is what the model uses (no bypass)."""
    config = small_config(str(tmp_path))
    tokens = jnp.ones((1, 32), jnp.int32)
    net, params = _params(config)
    twice = model.Decoder(model.ModelConfig.from_config(
        config, dot_general=lambda x, w, d, **k: 2 * lax.dot_general(x, w, d, **k)))
    a = net.apply({"params": params}, tokens)
    b = twice.apply({"params": params}, tokens)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_logical_axes_on_every_param(tmp_path):
    config = small_config(str(tmp_path))
    net = model.Decoder(model.ModelConfig.from_config(config))
    boxed = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32), jnp.int32))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


def test_flops_per_token(tmp_path):
    config = small_config(str(tmp_path))
    m = config.model
    _, params = _params(config)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    matmul = sum(x.size for path, x in leaves if path[-1].key in ("kernel", "embed"))
    expected = 6 * matmul + 12 * m.n_layers * m.seq_len * m.d_model
    assert sizes.flops_per_token(sizes.ModelSpec.from_config(config)) == expected
    # Doubling the depth about doubles the non-embedding part.
    deeper = small_config(str(tmp_path), **{"model.n_layers": 4})
    flops = lambda c: sizes.flops_per_token(sizes.ModelSpec.from_config(c))
    assert flops(deeper) > flops(config)


def test_bf16_compute_keeps_f32_params(tmp_path):
    config = small_config(str(tmp_path), **{"model.compute_dtype": "bfloat16"})
    net, params = _params(config)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = net.apply({"params": params}, jnp.zeros((1, 32), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def _scan_and_loop(config):
    """The loop model and the scanned one, with the same parameters (the loop's, stacked)."""
    loop = model.Decoder(model.ModelConfig.from_config(config))
    scan = model.Decoder(model.ModelConfig.from_config(config, scan_layers=True))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.model.vocab_size,
                                                           (4, config.model.seq_len + 1)))
    p_loop = nn.unbox(loop.init(jax.random.key(0), tokens[:, :-1])["params"])
    p_scan = nn.unbox(scan.init(jax.random.key(0), tokens[:, :-1])["params"])
    assert jax.tree.map(jnp.shape, p_scan)["blocks"]["block"]["attn"]["q"]["kernel"] == (
        config.model.n_layers, config.model.d_model, config.model.d_model)
    p_scan = layout.restack_layers(p_loop, p_scan)
    return loop, scan, p_loop, p_scan, tokens


def test_scan_layers_is_the_loop(tmp_path):
    """Under nn.scan the model computes what the loop does, gradients included, through the
    FP -> QAT switch (scales set per layer) and the quantizer health."""
    config = small_config(str(tmp_path), **{"quant.bits": 4.0, "quant.quantize_embedding": True})
    loop, scan, p_loop, p_scan, tokens = _scan_and_loop(config)
    q = quant.QuantConfig.from_config(config)
    p_loop, p_scan = qparams.init_scales(p_loop, q), qparams.init_scales(p_scan, q)
    for a, b in zip(jax.tree.leaves(p_loop), jax.tree.leaves(layout.unstack_layers(p_scan)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    grads = [jax.grad(lambda p, net=net: net.apply({"params": p}, tokens[:, :-1], tokens[:, 1:]))(
        p) for net, p in ((loop, p_loop), (scan, p_scan))]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(layout.unstack_layers(grads[1])),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))
    m_loop, m_scan = qparams.quant_metrics(p_loop, q), qparams.quant_metrics(p_scan, q)
    assert {k: float(v) for k, v in m_loop.items()} == {k: float(v) for k, v in m_scan.items()}


def test_scan_layers_keeps_the_program_flat_in_depth(tmp_path):
    """What scan is for: the lowered program of 8 layers is about the size of 2 layers' (one
    traced block), where the loop's grows with the depth (a proxy for compile time)."""
    sizes = {}
    for scan in (False, True):
        for n in (2, 8):
            config = small_config(str(tmp_path), **{"model.n_layers": n})
            net = model.Decoder(model.ModelConfig.from_config(config, scan_layers=scan))
            tokens = jnp.zeros((2, config.model.seq_len), jnp.int32)
            params = jax.eval_shape(lambda net=net, tokens=tokens: nn.unbox(
                net.init(jax.random.key(0), tokens)["params"]))
            sizes[scan, n] = len(jax.jit(jax.grad(lambda p, net=net, tokens=tokens: net.apply(
                {"params": p}, tokens, tokens))).lower(params).as_text())
    assert sizes[True, 8] < 1.2 * sizes[True, 2], sizes
    assert sizes[False, 8] > 2.5 * sizes[False, 2], sizes


def test_scanned_export_is_the_loops(tmp_path):
    from qat_jax.tools import packed

    config = small_config(str(tmp_path), **{"quant.bits": 2.0})
    _, _, p_loop, p_scan, _ = _scan_and_loop(config)
    q = quant.QuantConfig.from_config(config)
    p_loop, p_scan = qparams.init_scales(p_loop, q), qparams.init_scales(p_scan, q)
    scanned = runconfig.config_with(config, **{"model.scan_layers": True})
    packed.export_params(p_loop, resolve.resolve(config), tmp_path / "loop.safetensors")
    packed.export_params(p_scan, resolve.resolve(scanned), tmp_path / "scan.safetensors")
    (c1, w1), (c2, w2) = (packed.load(tmp_path / f"{n}.safetensors") for n in ("loop", "scan"))
    assert c2["model"]["scan_layers"] is False  # stored per layer, loadable by the loop
    for a, b in zip(jax.tree.leaves(w1), jax.tree.leaves(w2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_scan_layers_change_is_refused_on_resume(tmp_path):
    config = small_config(str(tmp_path))
    old = json.loads(config.to_json_best_effort())
    scanned = runconfig.config_with(config, **{"model.scan_layers": True})
    assert runconfig.config_diffs(old, scanned) == ["model.scan_layers: False -> True"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_backward_and_heads_first_layout(dtype):
    """RoPE's own backward (the rotation by minus the angle, used for 16-bit x) equals
    autodiff's, and the heads-first layout rotates the same numbers."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 4, 8)).astype(dtype)
    pos = jnp.arange(16)
    g = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
    half, shape = 4, (1, 16, 1, 4)
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / 8)
    angle = (pos[:, None] * freq[None, :]).reshape(shape)
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    _, vjp_own = jax.vjp(lambda t: rope._rotate(t, sin, cos), x)
    _, vjp_auto = jax.vjp(lambda t: rope._rotation(t, sin, cos), x)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.float32(vjp_own(g)[0]), np.float32(vjp_auto(g)[0]), atol=tol)
    np.testing.assert_array_equal(np.float32(rope.rope(x, pos, 10000.0)),
                                  np.float32(rope._rotation(x, sin, cos)))
    heads_first = rope.rope(jnp.swapaxes(x, 1, 2), pos, 10000.0, seq_axis=2)
    np.testing.assert_array_equal(np.float32(jnp.swapaxes(heads_first, 1, 2)),
                                  np.float32(rope.rope(x, pos, 10000.0)))


def test_rope_tables_are_constants_of_the_step(tmp_path):
    """With static positions (numpy's 0..L-1, as the model passes them) RoPE's sine and cosine
    tables are computed once, as the step is traced, to the same values: the compiled forward
    evaluates no sine or cosine (XLA CPU would evaluate them inside the rotation, again for
    every batch row and head). Traced positions keep them in the step."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 2, 8))
    static = jax.jit(lambda t: rope.rope(t, np.arange(16), 10000.0))
    traced = jax.jit(lambda t, p: rope.rope(t, p, 10000.0))
    np.testing.assert_array_equal(static(x), traced(x, jnp.arange(16)))
    assert "sine(" not in static.lower(x).compile().as_text()
    assert "sine(" in traced.lower(x, jnp.arange(16)).compile().as_text()
    config = small_config(str(tmp_path))
    net, params = _params(config)
    tokens = jnp.zeros((2, config.model.seq_len), jnp.int32)
    hlo = jax.jit(net.apply).lower({"params": params}, tokens).compile().as_text()
    assert "sine(" not in hlo and "cosine(" not in hlo
