"""The FP -> QAT switch in a training run: the scales set from the weights and the optimizer
moments kept or reset at the switch step, and a run that crosses it resuming bit for bit in
either phase."""

import json

import jax
import numpy as np
import optax
import pytest
from conftest import final_params, fixed_fraction, small_config
from test_train import _batch, _setup

from qat_jax import optim, qparams, quant, resolve, sharding, train
from qat_jax.tools import evaluate, export


def _qat_small(cache_dir, **overrides):
    """Small config, 2-bit QAT over the second half of its 20 steps."""
    return small_config(cache_dir, **{"quant.bits": 2.0, **fixed_fraction(0.5), **overrides})


def _adam(opt_state, group):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    partition = next(s for s in opt_state if isinstance(s, optax.transforms.PartitionState))
    return next(x for x in jax.tree.leaves(partition.inner_states[group], is_leaf=is_adam)
                if is_adam(x))


def _named(tree, names):
    return [x for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if optim._name(path) in names]


@pytest.mark.parametrize("reset", [False, True])
def test_switch_sets_scales_and_moments(cache_dir, reset):
    config = _qat_small(cache_dir, **{"qat.reset_moments": reset})
    mesh, setup = _setup(config)
    assert setup.plan.qat_start == 10
    with jax.set_mesh(mesh), sharding.axis_rules():
        state = setup.init(jax.random.key(0))
        for i in range(10):
            state, _ = setup.fp.step(state, sharding.shard_batch(_batch(config, i), mesh))
        before = jax.device_get(state)
        # Through FP the scales neither moved nor decayed, and their moments stayed 0.
        assert all(np.all(s == 1.0) for s in _named(before.params, optim.SCALES))
        assert all(np.all(m == 0.0) for m in jax.tree.leaves(_adam(before.opt_state,
                                                                   "scales").mu))
        state = setup.served.enter(state)
        after = jax.device_get(state)
        state, m = setup.served.step(state, sharding.shard_batch(_batch(config, 10), mesh))
        stepped = jax.device_get(state)
    q = quant.QuantConfig.from_config(config)
    want = _named(qparams.init_scales(before.params, q), optim.SCALES)
    for got, w in zip(_named(after.params, optim.SCALES), want, strict=True):
        np.testing.assert_array_equal(got, w)
    # Every projection's scale is set; the embedding's stays 1 (quant.quantize_embedding=False).
    assert not any(np.all(w == 1.0) for w in _named(qparams.init_scales(before.params, q),
                                                    ("quant_scale",)))
    for got, w in zip(_named(after.params, optim.DECAYED), _named(before.params, optim.DECAYED),
                      strict=True):
        np.testing.assert_array_equal(got, w)  # the weights are untouched by the switch
    scales_adam, weights_adam = _adam(after.opt_state, "scales"), _adam(after.opt_state, "weights")
    assert int(scales_adam.count) == 0  # fresh: the first QAT update is bias-corrected
    assert int(_adam(before.opt_state, "weights").count) == 10
    if reset:
        assert int(weights_adam.count) == 0
        assert all(np.all(x == 0) for x in jax.tree.leaves(weights_adam.mu))
    else:
        assert int(weights_adam.count) == 10
        for got, w in zip(jax.tree.leaves(weights_adam.mu),
                          jax.tree.leaves(_adam(before.opt_state, "weights").mu), strict=True):
            np.testing.assert_array_equal(got, w)
    # The LR schedule's count is the global step: the switch does not reset it.
    assert [int(s.count) for s in after.opt_state if isinstance(s, optax.ScaleByScheduleState)] \
        == [10]
    # The first QAT step trains the scales.
    moved = [np.max(np.abs(a - b)) for a, b in zip(_named(stepped.params, ("quant_scale",)),
                                                     _named(after.params, ("quant_scale",)),
                                                     strict=True)]
    assert min(moved) > 0 and np.isfinite(float(m["loss"]))


@pytest.mark.slow
def test_run_crosses_the_switch_and_resumes_in_each_phase(tmp_path, cache_dir, capsys):
    """A run with 2-bit QAT from step 10 of 20; the same run stopped in FP (step 5), resumed
    across the switch to a stop in QAT (step 15), then resumed to the end, is bit-identical."""
    config = _qat_small(cache_dir)
    straight = train.train(resolve.resolve(config), tmp_path / "straight")
    said = "".join(capsys.readouterr())  # the switch as the run reports it (its OptimSpec's)
    assert "step 10: FP -> QAT at 2 bits" in said and "Adam moments kept)" in said, said
    run = resolve.resolve(config)
    assert train.train(run, tmp_path / "split", train.Segment(stop_at=5)) == {"stopped_at": 5}
    # Before the switch the run's model is full precision: eval says so, export refuses.
    early = evaluate.evaluate_workdir(str(tmp_path / "split"))
    assert (early["step"], early["phase"], early["bits"]) == (5, "fp", None)
    assert "val_loss_fp" not in early and np.isfinite(early["val_loss"])
    with pytest.raises(ValueError, match=r"\(step 5\) is before the run's FP -> QAT switch at "
                                         r"step 10: nothing is quantized yet"):
        export.export_packed(str(tmp_path / "split"), str(tmp_path / "early.safetensors"))
    assert not (tmp_path / "early.safetensors").exists()
    assert train.train(run, tmp_path / "split", train.Segment(stop_at=15)) == {"stopped_at": 15}
    late = evaluate.evaluate_workdir(str(tmp_path / "split"))
    assert (late["step"], late["phase"], late["bits"]) == (15, "qat", 2.0)
    assert late["val_loss"] != late["val_loss_fp"]
    assert not (tmp_path / "split" / "result.json").exists()
    split = train.train(resolve.resolve(config), tmp_path / "split")
    assert split["val_loss"] == straight["val_loss"]
    assert split["final_train_loss"] == straight["final_train_loss"]
    (s1, p1), (s2, p2) = final_params(tmp_path / "straight", config), final_params(
        tmp_path / "split", config)
    assert s1 == s2 == 20
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)

    assert {k: straight[k] for k in ("B", "D_fp", "D_qat", "qat_start_step", "fused",
                                     "qat_fraction")} == {
        "B": 2.0, "D_fp": 2560, "D_qat": 2560, "qat_start_step": 10, "fused": True,
        "qat_fraction": 0.5}
    served = train.sizes.served_bytes(*train.sizes.specs(config), 2.0)["total"]
    assert straight["S"] == pytest.approx(5120 / served)
    assert straight["flops_fp"] + straight["flops_qat"] == pytest.approx(straight["flops"])
    # The served model is the quantized one; the same weights in full precision differ.
    assert straight["val_loss_fp"] != pytest.approx(straight["val_loss"], abs=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text()
            .splitlines()]
    logged = [r for r in rows if "phase" in r]
    assert [(r["step"], r["phase"]) for r in logged] == [(5, 0), (10, 0), (15, 1), (20, 1)]
    assert [r["step"] for r in logged if "clip_frac" in r] == [15, 20]
