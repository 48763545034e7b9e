import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from qat_jax import optim


def _config(tmp_path, **kw):
    c = small_config(str(tmp_path), **kw)
    c.schedule.total_tokens = 8 * 32 * 100  # 100 steps of 256 tokens
    c.schedule.warmup_frac = 0.1
    c.schedule.cooldown_frac = 0.2
    c.optimizer.peak_lr = 1e-3
    return c


def test_plan_boundaries(tmp_path):
    p = optim.plan(_config(tmp_path))
    got = (p.tokens_per_step, p.total_steps, p.warmup_steps, p.cooldown_start)
    assert got == (256, 100, 10, 80)
    assert p.total_tokens == 25600


def test_lr_at_boundaries(tmp_path):
    c = _config(tmp_path)
    lr = optim.lr_schedule(c, optim.plan(c))
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
    lr = optim.lr_schedule(c, optim.plan(c))
    assert float(lr(90)) == pytest.approx(1e-3 * (1 - 0.5 * 0.9))


@pytest.mark.parametrize("key,value,match", [
    ("schedule.total_tokens", 100, "less than one step"),
    ("schedule.cooldown_shape", "zigzag", "cooldown_shape"),
    ("schedule.warmup_frac", 1.5, "warmup_frac"),
])
def test_plan_rejects(tmp_path, key, value, match):
    c = _config(tmp_path)
    group, name = key.split(".")
    setattr(getattr(c, group), name, value)
    with pytest.raises(ValueError, match=match):
        optim.plan(c)


def test_weight_decay_only_on_matrices(tmp_path):
    c = _config(tmp_path)
    c.optimizer.grad_clip_norm = 0.0
    tx = optim.make_optimizer(c, optim.plan(c))
    params = {"embed": jnp.ones((3, 2)),
              "q": {"kernel": jnp.ones((2, 2)), "quant_scale": jnp.ones((1, 2))},
              "norm": {"scale": jnp.ones((2,))}}
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    # Zero gradients: only decoupled weight decay moves the weights; the norm scale and the
    # (2-D) quantizer scale are never decayed.
    assert float(updates["q"]["kernel"][0, 0]) == pytest.approx(-1e-4 * 0.01)
    assert float(updates["embed"][0, 0]) == pytest.approx(-1e-4 * 0.01)
    assert float(jnp.abs(updates["q"]["quant_scale"]).max()) == 0.0
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
    lr = optim.lr_schedule(c, optim.plan(c))  # cooldown: steps 80..99 (20 steps)
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
    with pytest.raises(ValueError, match=match):
        optim.plan(c)
