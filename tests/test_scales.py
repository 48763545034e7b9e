"""The quantizer scales' optimizer (qat.scale_update, scale_lr_mult, scale_warmup_frac) and the
quantizer health it is judged by: no scale may reach its floor at any bit width or LR."""

import json

import jax
import numpy as np
import pytest
from conftest import fixed_fraction, small_config

from qat_jax import data, optim, resolve, sharding, train, trainstep


def _qat_config(cache_dir, bits, **overrides):
    """Small config, QAT over the last 12 of its 16 steps, at the repro's peak LR unless set."""
    return small_config(cache_dir, **{"quant.bits": bits, **fixed_fraction(0.75),
                                      "schedule.total_tokens": 8 * 32 * 16, **overrides})


def _run_steps(config, steps=None):
    """Train `config` in memory on the corpus (FP, the switch, QAT); returns the parameters
    after the switch and after `steps` updates (default all), and the setup."""
    mesh = sharding.make_mesh(resolve.mesh_spec(config))
    setup = trainstep.Setup.create(resolve.planned(config), mesh)
    p = setup.plan
    spec = resolve.data_spec(config)
    batches = data.train_iterator(data.load_corpus(spec), spec)
    switched = None
    with jax.set_mesh(mesh), sharding.axis_rules():
        state = setup.init(jax.random.key(0))
        for step in range(p.total_steps if steps is None else steps):
            if step == p.qat_start:
                state = setup.phase(step).enter(state)
                switched = jax.device_get(state.params)
            state, _ = setup.phase(step).step(state, sharding.shard_batch(next(batches), mesh))
        health = jax.device_get(setup.served.health(state.params))
    return switched, jax.device_get(state.params), health


def _scales(params):
    return [x for path, x in jax.tree_util.tree_leaves_with_path(params)
            if optim._name(path) == "quant_scale"]


@pytest.mark.parametrize("bits,lr,max_clip", [
    (8.0, 3e-3, 0.05), (6.0, 3e-3, 0.05), (4.0, 3e-3, 0.05), (2.0, 1e-4, 0.05),
    (8.0, 1e-2, 0.15), (5.0, 1e-2, 0.15), (1.58, 1e-2, 0.15)])
def test_short_qat_keeps_every_scale_off_the_floor(cache_dir, bits, lr, max_clip):
    """12 QAT steps from a fresh switch at the LRs a user would pick: no scale at the floor,
    under 5% of the weights clipped at the repro's LR (a weight whose Adam steps carry it past
    its channel's range gets no gradient there and stays clipped: 2-3% at 8 bits; at LR 1e-2,
    about 10%), and every scale within
    its update rule's reach of where the switch put it. (With
    ParetoQ's additive Adam on the scales, an 8-bit scale of ~4e-4 meets a first step of
    lr = 3e-3 and most channels die in the first steps: see the next test.)"""
    config = _qat_config(cache_dir, bits, **{"optimizer.peak_lr": lr})
    switched, params, health = _run_steps(config)
    assert int(health["dead_scales"]) == 0 and float(health["dead_frac"]) == 0.0
    assert float(health["clip_frac"]) < max_clip, health
    # Every scale stayed within a factor exp(+-lr * 12 * 3) of its value at the switch.
    for a, b in zip(_scales(params), _scales(switched), strict=True):
        assert np.all(np.abs(np.log(a / b)) < 36 * lr)


def test_additive_scales_die_and_the_run_says_so(tmp_path, cache_dir, capsys):
    """ParetoQ's additive update at 8 bits and LR 3e-3 pushes scales onto the floor: the
    health metrics count them, the console says so once, and result.json keeps the count."""
    config = _qat_config(cache_dir, 8.0, **{"qat.scale_update": "additive",
                                            "logging.every_steps": 2})
    result = train.train(resolve.resolve(config), tmp_path)
    out = capsys.readouterr().out
    assert out.count("quantizer scales") == 1
    assert "sit at the floor 1e-05: their output channels are dead" in out
    health = result["quant_health"]
    assert health["dead_scales"] > 0 and health["dead_frac"] > 0.05, health
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    qat_rows = [r for r in rows if r.get("phase") == 1]
    assert qat_rows and all({"clip_frac", "quant_err", "dead_frac", "dead_scales"} <= set(r)
                            for r in qat_rows)
    assert qat_rows[-1]["dead_scales"] == health["dead_scales"]


@pytest.mark.slow
def test_scale_step_rules(cache_dir):
    """The first QAT step of each rule against ParetoQ's additive step from the same state:
    relative = additive x alpha; a multiplier scales it; a warmup over 6 of the 12 QAT steps
    starts at 1/6 of it. The weights' step is the same under every rule."""
    base = _qat_config(cache_dir, 4.0, **{"qat.scale_update": "additive"})
    qat_start = resolve.plan(base).qat_start
    switched, ref, _ = _run_steps(base, qat_start + 1)
    kernels = lambda p: [x for path, x in jax.tree_util.tree_leaves_with_path(p)
                         if optim._name(path) == "kernel"]
    for overrides, factor in [
            ({"qat.scale_update": "relative"}, "alpha"),
            ({"qat.scale_update": "additive", "qat.scale_lr_mult": 0.1}, 0.1),
            ({"qat.scale_update": "additive", "qat.scale_warmup_frac": 0.5}, 1 / 6)]:
        _, got, _ = _run_steps(_qat_config(cache_dir, 4.0, **overrides), qat_start + 1)
        for a0, a_ref, a_got in zip(_scales(switched), _scales(ref), _scales(got),
                                    strict=True):
            want = (a_ref - a0) * (a0 if factor == "alpha" else factor)
            np.testing.assert_allclose(a_got - a0, want, rtol=2e-3, atol=1e-9,
                                       err_msg=str(overrides))
            assert np.max(np.abs(a_ref - a0)) > 0
        for w_ref, w_got in zip(kernels(ref), kernels(got), strict=True):
            np.testing.assert_array_equal(w_ref, w_got, err_msg=str(overrides))


@pytest.mark.parametrize("key,value,match", [
    ("qat.scale_update", "log", r"qat.scale_update='log'; valid: \('relative', 'additive'\)"),
    ("qat.scale_lr_mult", 0.0, "qat.scale_lr_mult=0.0 must be positive"),
    ("qat.scale_warmup_frac", 1.5, r"qat.scale_warmup_frac=1.5 must be in \[0, 1\]"),
])
def test_scale_keys_checked(tmp_path, key, value, match):
    with pytest.raises(resolve.ConfigError, match=match):
        resolve.resolve(small_config(str(tmp_path), **{"quant.bits": 4.0, key: value}))
