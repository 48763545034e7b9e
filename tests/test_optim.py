import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_phases import _config, _qat_config

from qat_jax import optim, resolve


def test_lr_at_boundaries(tmp_path):
    c = _config(tmp_path)
    lr = optim.lr_schedule(resolve.optim_spec(c), resolve.plan(c))
    f = lambda s: float(lr(jnp.asarray(s)))
    assert f(0) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak: the first update is not wasted
    assert f(9) == pytest.approx(1e-3)  # the peak is reached at the last warmup step
    assert f(10) == pytest.approx(1e-3) and f(79) == pytest.approx(1e-3)
    assert f(80) == pytest.approx(1e-3)  # the cooldown starts at the peak (continuous)
    assert f(90) == pytest.approx(0.5e-3)
    assert f(99) == pytest.approx(0.05e-3)
    lrs = np.array([f(s) for s in range(100)])
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[80:]) < 0)


def test_final_lr_frac(tmp_path):
    c = _config(tmp_path)
    c.schedule.final_lr_frac = 0.1
    lr = optim.lr_schedule(resolve.optim_spec(c), resolve.plan(c))
    assert float(lr(90)) == pytest.approx(1e-3 * (1 - 0.5 * 0.9))


def test_weight_decay_only_on_matrices(tmp_path):
    c = _config(tmp_path)
    c.optimizer.grad_clip_norm = 0.0
    p = resolve.plan(c)
    o = resolve.optim_spec(c)
    tx = optim.make_optimizer(o, p, optim.lr_schedule(o, p))
    params = {"embed": jnp.ones((3, 2)), "head": jnp.ones((3, 2)),  # an untied head
              "head_quant_scale": jnp.ones((1, 3)),
              "q": {"kernel": jnp.ones((2, 2)), "quant_scale": jnp.ones((1, 2))},
              "norm": {"scale": jnp.ones((2,))}}
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    # Zero gradients: only decoupled weight decay moves the weights; the norm scale and the
    # (2-D) quantizer scale are never decayed.
    assert float(updates["q"]["kernel"][0, 0]) == pytest.approx(-1e-4 * 0.01)
    assert float(updates["embed"][0, 0]) == pytest.approx(-1e-4 * 0.01)
    assert float(jnp.abs(updates["q"]["quant_scale"]).max()) == 0.0
    assert float(updates["head"][0, 0]) == pytest.approx(-1e-4 * 0.01)
    assert float(jnp.abs(updates["head_quant_scale"]).max()) == 0.0
    assert optim.param_groups(params)["head_quant_scale"] == "scales"
    assert float(updates["norm"]["scale"][0]) == 0.0


# Expected LR factor at cooldown progress p, from METHOD.md section 6 (final = 0.1, c = 0.7).
SHAPES = {
    "linear": lambda p: 1 - 0.9 * p,
    "lowered_linear": lambda p: 0.7 - 0.6 * p,
    "cosine": lambda p: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p)),
    "mirror_cosine": lambda p: 2 * (1 - 0.9 * p) - (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p))),
    "square": lambda p: 0.1 + 0.9 * (1 - p**2),
    "one_minus_sqrt": lambda p: 0.1 + 0.9 * (1 - np.sqrt(p)),
    "exp": lambda p: 0.1**p,
}


def test_every_shape_is_tested():
    assert set(SHAPES) == set(optim.COOLDOWN_SHAPES)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cooldown_shapes(tmp_path, shape):
    c = _config(tmp_path)
    c.schedule.cooldown_shape = shape
    c.schedule.final_lr_frac = 0.1
    # cooldown: steps 80..99 (20 steps)
    lr = optim.lr_schedule(resolve.optim_spec(c), resolve.plan(c))
    f = lambda s: float(lr(jnp.asarray(s))) / 1e-3
    for step in (80, 85, 90, 99):
        assert f(step) == pytest.approx(SHAPES[shape]((step - 80) / 20), rel=1e-5), step
    assert f(79) == pytest.approx(1.0)  # the stable phase ends at the peak
    lrs = np.array([f(s) for s in range(80, 100)])
    assert np.all(np.diff(lrs) < 0)  # every shape decreases through the cooldown
    if shape == "lowered_linear":
        assert f(80) == pytest.approx(0.7)  # the jump
    else:
        assert f(80) == pytest.approx(1.0)  # continuous at the cooldown start
    assert f(99) > 0.1  # the final value is approached, not reached, at the last step


@pytest.mark.parametrize("key,value,match", [
    ("cooldown_shape", "exp", r"set schedule.final_lr_frac > 0"),
    ("lowered_linear_start", 1.5, r"schedule.lowered_linear_start=1.5 must be in"),
])
def test_shape_parameters_checked(tmp_path, key, value, match):
    c = _config(tmp_path)
    setattr(c.schedule, key, value)
    with pytest.raises(resolve.ConfigError, match=match):
        resolve.resolve(c)


# Expected LR factors, written out from METHOD.md section 1 for the plans above.
def _expected_fused(step, shape_fn):
    if step < 10:
        return (step + 1) / 10
    if step < 60:
        return 1.0
    return shape_fn((step - 60) / 40)


def _expected_unfused(step, shape_fn, qat_peak):
    if step < 10:
        return (step + 1) / 10
    if step < 45:
        return 1.0
    if step < 60:
        return shape_fn((step - 45) / 15)
    if step < 64:
        return qat_peak * (step - 60 + 1) / 4
    if step < 82:
        return qat_peak
    return qat_peak * shape_fn((step - 82) / 18)


BOUNDARIES = (0, 9, 10, 44, 45, 52, 59, 60, 61, 63, 64, 79, 81, 82, 90, 99)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("fused", [True, False])
def test_qat_lr_at_every_boundary(tmp_path, shape, fused):
    c = _qat_config(tmp_path, fused=fused)
    c.schedule.cooldown_shape, c.schedule.final_lr_frac = shape, 0.1
    if not fused:
        c.schedule.cooldown_frac, c.qat.warmup_frac, c.qat.cooldown_frac = 0.25, 0.1, 0.5
        c.qat.peak_lr = 5e-4  # re-warm to half the FP peak
    lr = optim.lr_schedule(resolve.optim_spec(c), resolve.plan(c))
    for step in BOUNDARIES:
        want = (_expected_fused(step, SHAPES[shape]) if fused else
                _expected_unfused(step, SHAPES[shape], 0.5))
        assert float(lr(step)) / 1e-3 == pytest.approx(want, rel=1e-5), step
    lrs = np.array([float(lr(s)) for s in range(100)])
    jump = 1.0 - (0.7 if shape == "lowered_linear" else 1.0)
    if fused:  # continuous at the switch: QAT starts at the stable LR and decays from it
        assert lrs[59] == pytest.approx(1e-3) and lrs[60] == pytest.approx(1e-3 * (1 - jump))
        assert np.all(np.diff(lrs[60:]) < 0)
    else:  # FP decays, QAT re-warms from ~0 to its own peak, holds, decays again
        assert np.all(np.diff(lrs[45:60]) < 0) and np.all(np.diff(lrs[60:64]) > 0)
        assert lrs[63] == pytest.approx(5e-4) and np.all(lrs[64:82] == lrs[63])
        assert np.all(np.diff(lrs[82:]) < 0)


def test_cooldown_b2(tmp_path):
    c = _qat_config(tmp_path, fused=False)
    c.schedule.cooldown_frac, c.qat.warmup_frac, c.qat.cooldown_frac = 0.25, 0.1, 0.5
    c.optimizer.cooldown_b2 = 0.99
    b2 = optim.b2_schedule(resolve.optim_spec(c), resolve.plan(c))
    got = {s: float(b2(s)) for s in (0, 44, 45, 59, 60, 81, 82, 99)}
    assert got == pytest.approx({0: 0.95, 44: 0.95, 45: 0.99, 59: 0.99, 60: 0.95, 81: 0.95,
                                 82: 0.99, 99: 0.99})
    c.optimizer.cooldown_b2 = None
    b2 = optim.b2_schedule(resolve.optim_spec(c), resolve.plan(c))
    assert float(b2(99)) == pytest.approx(0.95)
