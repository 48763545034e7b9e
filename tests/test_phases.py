import dataclasses

import pytest
from conftest import small_config

from qat_jax import law, resolve, sizes
from qat_jax.law import planner


def _config(tmp_path, **kw):
    c = small_config(str(tmp_path), **kw)
    c.schedule.total_tokens = 8 * 32 * 100  # 100 steps of 256 tokens
    c.schedule.warmup_frac = 0.1
    c.schedule.cooldown_frac = 0.2
    c.optimizer.peak_lr = 1e-3
    return c


def _qat_config(tmp_path, fraction=0.4, fused=True, **kw):
    """4 bits; `fraction` a number (policy 'fixed'), or the policy 'auto' or 'law'."""
    c = _config(tmp_path, **kw)  # 100 steps, warmup 10
    c.quant.bits = 4.0
    if fraction in resolve.FRACTION_POLICIES:
        c.qat.fraction_policy = fraction
    else:
        c.qat.fraction_policy, c.qat.fraction = "fixed", fraction
    c.qat.fused_cooldown = fused
    return c


# METHOD.md section 2's table of f*(S) = exp(-6.7297 / ln S).
TABLE = {10: 0.054, 30: 0.138, 100: 0.232, 300: 0.307, 1e3: 0.377, 3e3: 0.431, 1e4: 0.482,
         1e5: 0.557}


def test_plan_boundaries(tmp_path):
    p = resolve.plan(_config(tmp_path))
    got = (p.tokens_per_step, p.total_steps, p.warmup_steps, p.cooldown_start)
    assert got == (256, 100, 10, 80)
    assert p.total_tokens == 25600


@pytest.mark.parametrize("key,value,match", [
    ("schedule.total_tokens", 100, "less than one step"),
    ("schedule.cooldown_shape", "zigzag", "cooldown_shape"),
    ("schedule.warmup_frac", 1.5, "warmup_frac"),
])
def test_plan_rejects(tmp_path, key, value, match):
    c = _config(tmp_path)
    group, name = key.split(".")
    setattr(getattr(c, group), name, value)
    with pytest.raises(resolve.ConfigError, match=match):
        resolve.resolve(c)


def test_plan_fused(tmp_path):
    p = resolve.plan(_qat_config(tmp_path))
    assert (p.warmup_steps, p.qat_start, p.cooldown_start, p.total_steps) == (10, 60, 60, 100)
    assert p.fp_cooldown_start == p.qat_warmup_end == 60  # no FP cooldown, no re-warmup
    assert p.fused and p.bits == 4.0 and p.fraction == pytest.approx(0.4)
    assert p.trunk_end == 60 and p.qat_steps == 40


def test_plan_fused_holds_then_decays(tmp_path):
    c = _qat_config(tmp_path)
    c.qat.cooldown_frac = 0.5  # hold the stable LR for the first half of QAT
    p = resolve.plan(c)
    assert (p.qat_start, p.cooldown_start) == (60, 80)


def test_plan_unfused(tmp_path):
    c = _qat_config(tmp_path, fused=False)
    c.schedule.cooldown_frac = 0.25  # of the FP phase: 15 of its 60 steps
    c.qat.warmup_frac = 0.1  # 4 of the 40 QAT steps
    c.qat.cooldown_frac = 0.5  # half of the 36 steps after the re-warmup
    p = resolve.plan(c)
    assert (p.fp_cooldown_start, p.qat_start, p.qat_warmup_end, p.cooldown_start) == (
        45, 60, 64, 82)
    assert not p.fused and p.trunk_end == 45


def test_plan_reads_a_schedule_spec_not_a_config():
    """phases.plan takes the typed ScheduleSpec (resolve.schedule_spec): the unfused case
    above from the spec alone, and its bits and fused flag as given."""
    from qat_jax import phases

    spec = phases.ScheduleSpec(
        total_tokens=8 * 32 * 100, batch_size=8, seq_len=32, warmup_frac=0.1,
        cooldown_frac=0.25, qat_warmup_frac=0.1, qat_cooldown_frac=0.5, fused_cooldown=False,
        bits=4.0)
    p = phases.plan(spec, 0.4, "fixed", None)
    assert (p.total_steps, p.warmup_steps, p.fp_cooldown_start, p.qat_start, p.qat_warmup_end,
            p.cooldown_start) == (100, 10, 45, 60, 64, 82)
    assert p.bits == 4.0 and not p.fused
    fused = phases.plan(dataclasses.replace(spec, fused_cooldown=True), 0.4, "fixed", None)
    assert fused.fused and (fused.qat_start, fused.cooldown_start) == (60, 80)
    with pytest.raises(resolve.ConfigError, match="less than one step"):
        phases.steps(dataclasses.replace(spec, total_tokens=255))


def test_plan_full_precision_and_extremes(tmp_path):
    c = _qat_config(tmp_path)
    c.quant.bits = None
    p = resolve.plan(c)
    assert (p.bits, p.qat_start, p.cooldown_start, p.fraction, p.S) == (None, 100, 80, 0.0, None)
    c = _qat_config(tmp_path, fraction=0.0)  # bits set, no QAT: the same FP run
    assert resolve.plan(c).bits is None and resolve.plan(c).cooldown_start == 80
    c = _qat_config(tmp_path, fraction=1.0, fused=False)  # QAT from scratch: nothing to unfuse
    p = resolve.plan(c)
    assert (p.qat_start, p.fused, p.cooldown_start, p.trunk_end) == (0, True, 10, 0)


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
    size = sizes.served_bytes(*sizes.specs(c), 4.0)["total"]
    c.schedule.total_tokens = int(S_target * size) // 256 * 256
    p = resolve.plan(c)
    S = p.total_tokens / size
    assert p.S == pytest.approx(S) and S == pytest.approx(S_target, rel=1e-3)
    assert p.fraction == pytest.approx(TABLE[S_target], abs=1 / p.total_steps + 5e-4)
    assert p.fraction_note.startswith("auto")
    c.quant.quantize_embedding = True
    assert resolve.plan(c).S > p.S and resolve.plan(c).fraction > p.fraction


def test_auto_fraction_below_S_of_one(tmp_path):
    c = _qat_config(tmp_path, fraction="auto")  # 25,600 tokens for ~0.1M params: S < 1
    p = resolve.plan(c)
    assert p.S < 1 and p.fraction == pytest.approx(0.05)
    assert "undefined" in p.fraction_note and "qat.min_fraction" in p.fraction_note


@pytest.mark.parametrize("updates,match", [
    ({"qat.fraction_policy": "half"}, r"qat.fraction_policy='half'; valid: 'fixed' \(the number"),
    ({"qat.fraction": 1.5}, r"qat.fraction=1.5: qat.fraction_policy='fixed' needs a number in"),
    ({"qat.fraction": None}, r"qat.fraction=None: qat.fraction_policy='fixed' needs a number"),
    ({"qat.fraction_policy": "auto"}, r"qat.fraction=0.4 is read only with "
                                      r"qat.fraction_policy='fixed' \(it is 'auto'\)"),
    ({"qat.fraction": 0.001}, r"rounds to 0 of the 100 steps"),
    ({"qat.peak_lr": 1e-4}, r"qat.peak_lr=0.0001 is the peak of the unfused"),
    ({"qat.scale_update": "log"}, r"qat.scale_update='log'; valid"),
    ({"qat.cooldown_frac": 2.0}, r"qat.cooldown_frac=2.0 must be in \[0, 1\]"),
    ({"optimizer.cooldown_b2": 1.0}, r"optimizer.cooldown_b2=1.0 must be in \[0, 1\)"),
    ({"qat.fused_cooldown": False, "qat.fraction": 0.9}, r"unfused cooldown: the FP phase"),
])
def test_qat_plan_rejects(tmp_path, updates, match):
    c = _qat_config(tmp_path)
    for key, value in updates.items():
        group, name = key.split(".")
        setattr(getattr(c, group), name, value)
    with pytest.raises(resolve.ConfigError, match=match):
        resolve.resolve(c)


def test_law_fraction(tmp_path):
    from test_planner import PARAMS

    # omega != xi + rho: the optimum moves with S, so the model's bytes matter.
    fitted = law.Law(law.qat, {**PARAMS, "omega": 0.2})
    fitted.save(tmp_path / "law.json")
    c = _qat_config(tmp_path, fraction="law")
    c.qat.law_file = str(tmp_path / "law.json")
    p = resolve.plan(c)
    n = sizes.param_count(*sizes.specs(c))["total"]
    want, _ = planner.optimal_fraction(fitted, n, p.total_tokens, 4.0,
                                       sizes.served_bytes(*sizes.specs(c), 4.0)["total"])
    by_rule, _ = planner.optimal_fraction(fitted, n, p.total_tokens, 4.0)  # N B / 8: 0.61
    assert abs(want - by_rule) > 0.02  # the served bytes (0.58), not N B / 8
    assert p.fraction == pytest.approx(round(want * 100) / 100) and 0 < p.fraction < 1
    assert p.fraction_note.startswith("law: optimum of")
    c.qat.law_file = str(tmp_path / "missing.json")
    with pytest.raises(resolve.ConfigError, match="qat.law_file: .*missing.json: no such law"):
        resolve.resolve(c)
    c.qat.law_file = ""
    with pytest.raises(resolve.ConfigError, match="qat.fraction_policy='law' needs qat.law_file"):
        resolve.resolve(c)


def test_a_run_plans_once(tmp_path, monkeypatch):
    """The plan is computed once per run (resolve.resolve returns it in the Run that train is
    given, and train hands it to trainstep.Setup): with fraction_policy=law, one law load and
    one search."""
    from test_planner import PARAMS

    from qat_jax import train

    law.Law(law.qat, {**PARAMS, "omega": 0.2}).save(tmp_path / "law.json")
    c = _qat_config(tmp_path, fraction="law")
    c.qat.law_file = str(tmp_path / "law.json")
    loads, load = [], law.load_law
    monkeypatch.setattr(law, "load_law", lambda path: loads.append(path) or load(path))
    out = train.train(resolve.resolve(c), tmp_path / "run", train.Segment(stop_at=1))
    assert out == {"stopped_at": 1} and loads == [str(tmp_path / "law.json")]


def test_train_takes_a_resolved_run(tmp_path):
    """A config handed to train.train directly (the API before resolve) is refused with the
    call that works, before anything is written."""
    from qat_jax import train

    c = _qat_config(tmp_path)
    with pytest.raises(TypeError, match=r"train.train\(resolve.resolve\(config\), workdir\)"):
        train.train(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_builds_its_specs_once(tmp_path, monkeypatch):
    """resolve builds the model's and the quantization's specs once: the fraction policy and
    the Run share them (they were built twice, then three times, per `qat-jax train`)."""
    from qat_jax import quant, resolve

    config = small_config(str(tmp_path), **{"quant.bits": 4.0, "qat.fraction_policy": "auto"})
    built = []
    real = quant.QuantConfig.from_config
    monkeypatch.setattr(quant.QuantConfig, "from_config",
                        classmethod(lambda cls, c: built.append(1) or real(c)))
    run = resolve.resolve(config)
    assert len(built) == 1
    assert run.quant.bits == 4.0 and run.model.d_model == config.model.d_model
