import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from qat_jax import law, model, optim, planner


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


# ----------------------------------------------------------------------------- the QAT plan


def _qat_config(tmp_path, fraction="0.4", fused=True, **kw):
    c = _config(tmp_path, **kw)  # 100 steps, warmup 10
    c.quant.bits = 4.0
    c.qat.fraction = fraction
    c.qat.fused_cooldown = fused
    return c


def test_plan_fused(tmp_path):
    p = optim.plan(_qat_config(tmp_path))
    assert (p.warmup_steps, p.qat_start, p.cooldown_start, p.total_steps) == (10, 60, 60, 100)
    assert p.fp_cooldown_start == p.qat_warmup_end == 60  # no FP cooldown, no re-warmup
    assert p.fused and p.bits == 4.0 and p.fraction == pytest.approx(0.4)
    assert p.trunk_end == 60 and p.qat_steps == 40


def test_plan_fused_holds_then_decays(tmp_path):
    c = _qat_config(tmp_path)
    c.qat.cooldown_frac = 0.5  # hold the stable LR for the first half of QAT
    p = optim.plan(c)
    assert (p.qat_start, p.cooldown_start) == (60, 80)


def test_plan_unfused(tmp_path):
    c = _qat_config(tmp_path, fused=False)
    c.schedule.cooldown_frac = 0.25  # of the FP phase: 15 of its 60 steps
    c.qat.warmup_frac = 0.1  # 4 of the 40 QAT steps
    c.qat.cooldown_frac = 0.5  # half of the 36 steps after the re-warmup
    p = optim.plan(c)
    assert (p.fp_cooldown_start, p.qat_start, p.qat_warmup_end, p.cooldown_start) == (
        45, 60, 64, 82)
    assert not p.fused and p.trunk_end == 45


def test_plan_full_precision_and_extremes(tmp_path):
    c = _qat_config(tmp_path)
    c.quant.bits = None
    p = optim.plan(c)
    assert (p.bits, p.qat_start, p.cooldown_start, p.fraction, p.S) == (None, 100, 80, 0.0, None)
    c = _qat_config(tmp_path, fraction="0")  # bits set, no QAT: the same FP run
    assert optim.plan(c).bits is None and optim.plan(c).cooldown_start == 80
    c = _qat_config(tmp_path, fraction="1", fused=False)  # QAT from scratch: nothing to unfuse
    p = optim.plan(c)
    assert (p.qat_start, p.fused, p.cooldown_start, p.trunk_end) == (0, True, 10, 0)


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
    lr = optim.lr_schedule(c, optim.plan(c))
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
    b2 = optim.b2_schedule(c, optim.plan(c))
    got = {s: float(b2(s)) for s in (0, 44, 45, 59, 60, 81, 82, 99)}
    assert got == pytest.approx({0: 0.95, 44: 0.95, 45: 0.99, 59: 0.99, 60: 0.95, 81: 0.95,
                                 82: 0.99, 99: 0.99})
    c.optimizer.cooldown_b2 = None
    assert float(optim.b2_schedule(c, optim.plan(c))(99)) == pytest.approx(0.95)


# METHOD.md section 2's table of f*(S) = exp(-6.7297 / ln S).
TABLE = {10: 0.054, 30: 0.138, 100: 0.232, 300: 0.307, 1e3: 0.377, 3e3: 0.431, 1e4: 0.482,
         1e5: 0.557}


def test_closed_form_matches_method_table():
    for S, f in TABLE.items():
        assert law.closed_form_fraction(S) == pytest.approx(f, abs=5e-4), S
    with pytest.raises(ValueError, match="S > 1"):
        law.closed_form_fraction(0.9)


@pytest.mark.parametrize("S_target", [30, 1e3])
def test_auto_fraction_is_f_star_of_the_runs_S(tmp_path, S_target):
    """A budget chosen to give S_target tokens per byte of the served 4-bit model plans
    f*(S_target); quantizing the embedding (to 4 bits, from bf16) makes the model smaller: a
    larger S, a larger f*."""
    c = _qat_config(tmp_path, fraction="auto")
    size = model.served_bytes(c, 4.0)["total"]
    c.schedule.total_tokens = int(S_target * size) // 256 * 256
    p = optim.plan(c)
    S = p.total_tokens / size
    assert p.S == pytest.approx(S) and S == pytest.approx(S_target, rel=1e-3)
    assert p.fraction == pytest.approx(TABLE[S_target], abs=1 / p.total_steps + 5e-4)
    assert p.fraction_note.startswith("auto")
    c.quant.quantize_embedding = True
    assert optim.plan(c).S > p.S and optim.plan(c).fraction > p.fraction


def test_auto_fraction_below_S_of_one(tmp_path):
    c = _qat_config(tmp_path, fraction="auto")  # 25,600 tokens for ~0.1M params: S < 1
    p = optim.plan(c)
    assert p.S < 1 and p.fraction == pytest.approx(0.05)
    assert "undefined" in p.fraction_note and "qat.min_fraction" in p.fraction_note


@pytest.mark.parametrize("updates,match", [
    ({"qat.fraction": "half"}, r"qat.fraction='half'; valid: a number in \[0, 1\], 'auto'"),
    ({"qat.fraction": "1.5"}, r"qat.fraction='1.5'"),
    ({"qat.fraction": "0.001"}, r"rounds to 0 of the 100 steps"),
    ({"qat.peak_lr": 1e-4}, r"qat.peak_lr=0.0001 is the peak of the unfused"),
    ({"qat.scale_update": "log"}, r"qat.scale_update='log'; valid"),
    ({"qat.cooldown_frac": 2.0}, r"qat.cooldown_frac=2.0 must be in \[0, 1\]"),
    ({"optimizer.cooldown_b2": 1.0}, r"optimizer.cooldown_b2=1.0 must be in \[0, 1\)"),
    ({"qat.fused_cooldown": False, "qat.fraction": "0.9"}, r"unfused cooldown: the FP phase"),
])
def test_qat_plan_rejects(tmp_path, updates, match):
    c = _qat_config(tmp_path)
    for key, value in updates.items():
        group, name = key.split(".")
        setattr(getattr(c, group), name, value)
    with pytest.raises(ValueError, match=match):
        optim.plan(c)


def test_law_fraction(tmp_path):
    from test_planner import PARAMS

    # omega != xi + rho: the optimum moves with S, so the model's bytes matter.
    fitted = law.Law(law.qat, {**PARAMS, "omega": 0.2})
    fitted.save(tmp_path / "law.json")
    c = _qat_config(tmp_path, fraction="law")
    c.qat.law_file = str(tmp_path / "law.json")
    p = optim.plan(c)
    n = model.param_count(c)["total"]
    want, _ = planner.optimal_fraction(fitted, n, p.total_tokens, 4.0,
                                       model.served_bytes(c, 4.0)["total"])
    by_rule, _ = planner.optimal_fraction(fitted, n, p.total_tokens, 4.0)  # N B / 8: 0.61
    assert abs(want - by_rule) > 0.02  # the served bytes (0.58), not N B / 8
    assert p.fraction == pytest.approx(round(want * 100) / 100) and 0 < p.fraction < 1
    assert p.fraction_note.startswith("law: optimum of")
    c.qat.law_file = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="qat.law_file: .*missing.json: no such law file"):
        optim.plan(c)
    c.qat.law_file = ""
    with pytest.raises(ValueError, match="qat.fraction='law' needs qat.law_file"):
        optim.plan(c)
