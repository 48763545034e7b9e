"""The WSD law (qat_jax/law/wsd.py, METHOD.md section 3c): its formulas written out, the
annealing integral against the multi-power law's own sum over LR steps, its bounds, a truth
recovered from a repro-shaped table, and the committed study's law held to issue 28's bar."""

import json
from pathlib import Path

import numpy as np
import pytest
from test_lawsched import _sched_records, assert_optima_recovered

from qat_jax import law as law_lib
from qat_jax import resolve
from qat_jax.law import planner
from qat_jax.law import wsd as lawwsd

WSD_TRUTH = {"e": np.log(3.0), "a": np.log(0.4), "b": np.log(0.5), "beta": 0.8,
             "log_g": np.log(0.05), "sigma": 0.5, "log_w": np.log(3e4), "zeta": 0.6,
             "upsilon": 0.3,
             "log_theta": np.log(0.3), "kappa": 1.0, "gamma": 0.4, "eta": 0.2,
             "omega": 0.3, "log_lambda": np.log(0.8), "mu": 0.0,
             "nu": 0.2, "xi": 1.2, "log_tau": np.log(0.14)}
REPRO = Path(__file__).resolve().parents[1] / "docs" / "repro"
TPP = law_lib.qat_wsd.with_options(anneal_tpp=True)  # the truth: w scaled by D/N


def _law(**changes):
    return law_lib.Law(TPP, {**WSD_TRUTH, **changes})


def test_the_law_is_the_documented_formulas():
    """At a fused QAT run and at a full-precision run, the law equals METHOD.md 3c's formulas
    written out in numpy (the annealing integral by scipy's adaptive quadrature, which the
    law's 24-point Gauss-Legendre rule matches to 1e-7)."""
    from scipy.integrate import quad

    p = WSD_TRUTH
    N, D, f, B = 1.6e5, 3e6, 0.35, 2.0
    n, d = N / 1e5, D / 1e6

    def fp(cool):
        constant = (np.exp(p["e"]) + np.exp(p["a"]) / n ** p["beta"]
                    + np.exp(p["b"]) / ((D - cool / 2) / 1e6) ** p["beta"])
        gain = constant * (1 - np.exp(-np.exp(p["log_g"]) * d ** p["sigma"] / constant))
        w_eff = np.exp(p["log_w"]) * (d / n) ** -p["upsilon"]
        h = quad(lambda v: 1 - np.exp(-cool * v ** (2 - p["zeta"]) / (2 * w_eff)), 0, 1)[0]
        return constant - gain * h

    damage = np.exp(p["log_theta"]) * 2 ** (-p["kappa"] * B) * d ** p["gamma"] / n ** p["eta"]
    unrecovered = f ** -p["omega"]
    early = (np.exp(p["log_lambda"]) * 2 ** (-p["mu"] * B) / (n ** p["nu"] * d ** p["xi"])
             * np.exp(-(1 - f) / np.exp(p["log_tau"])))
    law = _law()
    assert float(law(N, (1 - f) * D, f * D, B, None, f * D)) == pytest.approx(
        fp(f * D) + damage * unrecovered + early, rel=1e-7)  # 24-node quadrature
    assert float(law(N, D, 0.0, 16.0, None, 0.2 * D)) == pytest.approx(fp(0.2 * D), rel=1e-7)
    assert float(law(N, D, 0.0, 16.0)) == float(law(N, D, 0.0, 16.0, None, 0.2 * D))  # default
    assert np.isinf(law.log_loss(N, D, 0.0, 4.0))  # post-training quantization: not modelled


def test_a_law_file_from_before_anneal_tpp_keeps_its_meaning(tmp_path):
    """A law file that names no anneal_tpp or saturation option (written before they existed)
    loads as the law it was fitted as, w fixed and the exp saturation (18 parameters, sigma and
    no upsilon), and predicts what that law predicted; one written now names the options and
    loads as itself."""
    old = law_lib.Law(law_lib.qat_wsd.with_options(anneal_tpp=False),
                      {k: v for k, v in WSD_TRUTH.items() if k != "upsilon"})
    old.save(tmp_path / "new.json")
    obj = json.loads((tmp_path / "new.json").read_text())
    assert obj["options"] == {"pin_fp": False, "anneal_tpp": False, "saturation": "exp"}
    del obj["options"]["anneal_tpp"], obj["options"]["saturation"]
    (tmp_path / "old.json").write_text(json.dumps(obj))
    for name in ("old.json", "new.json"):
        loaded = law_lib.load_law(tmp_path / name)
        assert loaded.form.options["anneal_tpp"] is False and "upsilon" not in loaded.params
        assert loaded.form.options["saturation"] == "exp" and "sigma" in loaded.params
        assert float(loaded(1.6e5, 2e6, 1e6, 4.0)) == float(old(1.6e5, 2e6, 1e6, 4.0))
    # upsilon = 0 is the law with w fixed; upsilon > 0: a model trained further anneals sooner
    N, D, cool = 1.6e5, 3e6, 3e5
    assert float(_law(upsilon=0.0)(N, D, 0.0, 16.0, None, cool)) == pytest.approx(
        float(old(N, D, 0.0, 16.0, None, cool)), rel=1e-12)
    gain = [float(_law(upsilon=0.0)(N, D, 0.0, 16.0, None, 0.0))
            - float(_law(upsilon=c)(N, D, 0.0, 16.0, None, cool)) for c in (0.0, 0.3)]
    assert gain[1] > gain[0] > 0  # at d / n = 30: w_eff = w 30^-0.3, a shorter window
    with pytest.raises(law_lib.LawError, match="anneal_tpp must be true or false"):
        law_lib.qat_wsd.with_options(anneal_tpp="sometimes")


def test_annealed_share_is_the_multi_power_law_sum_over_lr_steps():
    """h(D_cool) equals the multi-power law's loss reduction summed over the LR drops of a
    linear cooldown in 2,000 steps (each drop realising 1 - exp(-(LR area after it) / (its
    LR^zeta w))), over cooldowns 100 times shorter to 100 times longer than the window; it is
    0 without a cooldown, rises with its length and tends to 1."""
    import jax

    w, zeta, steps = 3e4, 0.6, 2000

    def share(cool):  # in float64, as the law evaluates it (Law.log_loss)
        with jax.enable_x64(True):
            return float(lawwsd.annealed_share(np.float64(cool), np.log(w), zeta))

    for cool in (3e2, 3e3, 3e4, 3e5, 3e6):
        lr = 1 - np.arange(1, steps + 1) / steps  # the LR after each step of the cooldown
        area_after = (np.cumsum(lr[::-1])[::-1] - lr) * cool / steps
        drop = 1 / steps
        expected = np.sum(drop * (1 - np.exp(-area_after / (np.maximum(lr, 1e-12) ** zeta
                                                               * w))))
        assert share(cool) == pytest.approx(expected, abs=2e-3)
    hs = [share(c) for c in (0.0, 1e3, 1e4, 1e5, 1e6, 1e9)]
    assert hs[0] == 0 and all(b > a for a, b in zip(hs, hs[1:], strict=False))
    assert hs[-1] == pytest.approx(1.0, abs=1e-3)


def test_power_saturation_is_the_multi_power_law_g_with_finite_b():
    """saturation=power: each LR drop realises the multi-power law's own G(x) = 1 - (1 + x)^-b
    (b finite) of its share; summed over the drops of a 2,000-step linear cooldown it matches
    the integral, rises more slowly than 1 - exp(-x) (below it at every length, and 6x as far
    from 1 at 1e8 tokens), and tends to 1. Its gain does not grow with D:
    the FP loss of a run 1,000x longer keeps a cooldown gain no larger than g."""
    import jax

    w, zeta, b, steps = 3e4, 0.6, 0.7, 2000

    def share(cool):
        with jax.enable_x64(True):
            return float(lawwsd.annealed_share(np.float64(cool), np.log(w), zeta, np.log(b)))

    for cool in (3e2, 3e4, 3e6):
        lr = 1 - np.arange(1, steps + 1) / steps
        area_after = (np.cumsum(lr[::-1])[::-1] - lr) * cool / steps
        x = area_after / (np.maximum(lr, 1e-12) ** zeta * w)
        assert share(cool) == pytest.approx(np.sum((1 - (1 + x) ** -b) / steps), abs=2e-3)
    cools = (1e5, 1e6, 1e8, 1e14)
    slow = [share(c) for c in cools]
    with jax.enable_x64(True):
        fast = [float(lawwsd.annealed_share(np.float64(c), np.log(w), zeta)) for c in cools]
    assert all(a < b for a, b in zip(slow[:3], fast[:3], strict=True))
    assert 1 - slow[2] > 5 * (1 - fast[2])  # at 1e8 tokens: still 3% short, the exp form 0.5%
    assert slow[-1] == pytest.approx(1.0, abs=2e-3)
    power = law_lib.qat_wsd.with_options(saturation="power")
    p = {k: WSD_TRUTH[k] for k in power.params if k in WSD_TRUTH} | {"log_b": np.log(b)}
    N, g = 1.6e5, np.exp(WSD_TRUTH["log_g"])

    def gain(law, D):  # what a cooldown over a tenth of the run gains, less the LR area lost
        return float(law(N, D, 0.0, 16.0, None, 0.0)) - float(law(N, D, 0.0, 16.0, None, D / 10))

    assert gain(law_lib.Law(power, p), 3e6) <= g and 0 < gain(law_lib.Law(power, p), 3e9) <= g
    assert gain(law_lib.Law(law_lib.qat_wsd, {k: WSD_TRUTH[k] for k in law_lib.qat_wsd.params}),
                3e9) > 10 * g  # the exp form's g d^sigma: 55x g at 3e9 tokens
    with pytest.raises(law_lib.LawError, match=r"saturation='log'; valid: \('exp', 'power'\)"):
        law_lib.qat_wsd.with_options(saturation="log")


def test_a_cooldown_trades_lr_area_for_annealing_and_the_loss_stays_positive():
    """Full precision at one (N, D): a short cooldown beats none (annealing), a cooldown over
    the whole run loses to a moderate one (LR area); the gain is capped by the constant-LR
    loss, so even a huge fitted gain leaves a positive loss."""
    law = _law()
    N, D = 1.6e5, 3e6
    loss = {c: float(law(N, D, 0.0, 16.0, None, c * D)) for c in (0.0, 0.1, 1.0)}
    assert loss[0.1] < loss[0.0] and loss[0.1] < loss[1.0]
    huge = _law(log_g=np.log(1e6))
    assert 0 < float(huge(N, D, 0.0, 16.0, None, 0.5 * D)) < loss[0.1]


def test_the_penalty_terms_read_as_documented():
    """Damage grows with the tokens (gamma > 0) and falls with more bits; more QAT share
    recovers it (omega > 0); the early-switch cost is what turns the penalty up at large f:
    with lambda -> 0 the penalty only falls with f."""
    law, N, D = _law(), 1.6e5, 3e6

    def penalty(law, f, B=2.0, D=D):
        return (float(law(N, (1 - f) * D, f * D, B, None, f * D))
                - float(law(N, D, 0.0, 16.0, None, f * D)))

    assert penalty(law, 0.3, D=6e6) > penalty(law, 0.3, D=3e6)
    assert penalty(law, 0.3, B=4.0) < penalty(law, 0.3)
    fs = np.linspace(0.05, 0.95, 19)
    no_early = _law(log_lambda=-50.0)
    assert np.all(np.diff([penalty(no_early, f) for f in fs]) < 0)
    with_early = [penalty(law, f) for f in fs]
    assert np.argmin(with_early) not in (0, len(fs) - 1)


@pytest.mark.slow
def test_fit_recovers_a_truth_and_its_optima():
    """A repro-shaped table (3 sizes, 2 budgets, 2 and 4 bits, 7 fractions, every control)
    drawn from the law: the joint fit reproduces the losses and puts every optimum within
    0.03 of the truth's, all of them interior."""
    truth = _law()
    runs = law_lib.Runs.from_records(_sched_records(truth))
    fitted = law_lib.fit(runs, TPP)
    assert fitted.fit["rmse"] < 2e-3
    assert_optima_recovered(truth, fitted)


def test_the_committed_study_law_against_the_bar():
    """docs/repro/report.json (regenerated byte for byte from the committed runs table by
    tests/test_committed_study.py), against issue 28's bar. Every point is at two seeds, the
    two noisiest at three. Chosen by held-out error: the WSD law with the multi-power law's
    power saturation and a constant annealing gain; its optimum is interior in every
    (point, B) group, within 0.06 of the measured optima on average, and the largest size
    held out of its fit is predicted within 2% (1.95%). Its within-group RMSE is 0.0115 with
    the seeds pooled, over the bar's 0.01 (the seed noise alone leaves a true law 0.0079).
    The exp-saturation WSD law (gain g d^sigma) fits the U curves within the bar (0.0097) but
    predicts the held-out size 3.7% off: no variant meets both (docs/REPRODUCTION.md). Left
    out point by point, every optimum of the rest stays interior, and the left-out point's
    losses are predicted within 2.2%."""
    report = json.loads((REPRO / "report.json").read_text())
    study = report["law_study"]
    chosen = study["variants"][study["chosen"]]
    assert study["chosen"] == "wsd, power saturation"
    assert chosen["form"] == "qat_wsd" and chosen["options"]["saturation"] == "power"
    assert chosen["interior"] == chosen["groups"] == 42
    assert chosen["f_mae"] <= 0.06 and chosen["f_mae_pooled"] <= 0.06
    assert chosen["holdout_mean_rel_err"] <= 0.02 and chosen["holdout_f_mae"] <= 0.06
    floor = report["noise"]["within_floor"]
    assert len(report["noise"]["points"]) == 8 and floor["pooled"] < floor["per_seed"]
    assert floor["pooled"] < chosen["within_rmse_pooled"] <= 0.012  # the bar's 0.01: not met
    assert floor["per_seed"] < chosen["within_rmse"] <= 0.0155
    exp = study["variants"]["wsd"]  # the other side of the trade
    assert exp["within_rmse_pooled"] <= 0.01 and exp["holdout_mean_rel_err"] > 0.03
    assert study["variants"]["wsd, annealing by D/N"]["holdout_mean_rel_err"] > 0.05
    dropped = study["robustness"]["without_f0.05"]
    assert dropped["interior"] == dropped["groups"] and dropped["f_mae"] <= 0.06
    assert dropped["within_rmse_pooled"] <= 0.0105
    loo = study["robustness"]["leave_one_point_out"]
    assert len(loo) == 6  # six points, each with all its seeds
    for point, q in loo.items():
        assert "(seeds 0, 1" in point, point
        assert q["interior"] == q["groups"] and q["f_mae"] <= 0.07, point  # the rest's optima
        assert q["point_interior"] == q["point_groups"], point
        assert q["point_mean_rel_err"] <= 0.022, point  # the left-out point's losses
        assert q["within_rmse_pooled"] <= 0.014, point
    # Where it misses: the FP controls' price of a longer cooldown depends on the model's
    # size at equal tokens per parameter (one peak LR for every size), which the chosen law,
    # whose price of a cooldown depends on the tokens alone, cannot follow: the 40k model's
    # rises more steeply than the law says, the 169k model's less, the 537k model's as it
    # says.
    rows = {r["point"]: r for r in study["misses"]}
    assert len(rows) == 6 and all(0 <= r["within_rmse_pooled"] < 0.02 for r in rows.values())
    assert rows["xxs2-0.8M"]["fp_rise"] > rows["xxs2-0.8M"]["fp_rise_law"] + 0.05
    assert rows["xs-1.7M"]["fp_rise"] < rows["xs-1.7M"]["fp_rise_law"] - 0.03
    assert rows["xs-3.4M"]["fp_rise"] < 0.0 < rows["xs-3.4M"]["fp_rise_law"]
    assert abs(rows["s-5.4M"]["fp_rise"] - rows["s-5.4M"]["fp_rise_law"]) < 0.005
    # the same tokens per parameter, the opposite sides of the law
    assert abs(rows["xxs2-0.8M"]["tokens_per_param"] - rows["xs-3.4M"]["tokens_per_param"]) < 1


def test_a_plan_the_law_cannot_make_is_refused(tmp_path):
    """Outside the range it was fitted to, the committed law's optimum runs to an end of
    [0, 1]: `qat.fraction_policy=law` refuses such a plan before anything is built, naming
    why, how far outside the law's runs it is, and what to use; `qat-jax plan` says the same
    and plans with the closed form instead."""
    from conftest import run_cli
    from test_phases import _qat_config

    c = _qat_config(tmp_path, fraction="law")
    c.qat.law_file = str(REPRO / "law.json")
    c.schedule.total_tokens = 300_000_000
    with pytest.raises(resolve.ConfigError) as e:
        resolve.resolve(c)
    # (E is no floor of this law: its cooldown's gain is subtracted from it)
    assert "means nothing: its optimum is at an end of [0, 1] (f* = 1.000) (D = 3e+08 is " \
        "55.6x the largest budget it was fitted to (5.4e+06)). Use" in str(e.value)
    assert "qat.fraction_policy='auto'" in str(e.value)
    plan = run_cli(["plan", f"--law={REPRO / 'law.json'}", "--params=86e6", "--tokens=10e9",
                    "--bits=4"])
    assert "an extrapolation: N = 8.6e+07 is 160x the largest model it was fitted to " \
        "(5.37e+05); D = 1e+10 is 1,852x the largest budget it was fitted to (5.4e+06)" in \
        plan.stdout
    assert "warning: this law's plan means nothing here: its optimum is at an end" in \
        plan.stdout and "takes the closed form's fraction 0.291 instead" in plan.stdout
    assert plan.stdout.rstrip().endswith("--config.qat.fraction=0.2908")
    mem = run_cli(["plan", f"--law={REPRO / 'law.json'}", "--memory=100KB", "--tokens=10e9"])
    rows = [line for line in mem.stdout.splitlines() if line.startswith("  B ")]
    assert len(rows) == 8 and all("(means nothing: its optimum is at an end" in line
                                  for line in rows if not line.startswith("  B    16"))
    assert "an extrapolation: N = 8e+05 is 1.49x the largest model" in mem.stdout
    small = run_cli(["plan", f"--law={REPRO / 'law.json'}", "--memory=10KB", "--tokens=2e6"])
    assert "an extrapolation: N = 5e+03 is 1/8.01 of the smallest model it was fitted to" in \
        small.stdout  # the smallest row's model (16 bits): the largest (1 bit) is inside


def test_the_committed_law_plans_a_training_run(tmp_path):
    """docs/repro/law.json (a qat_wsd law) drives `qat.fraction_policy=law`: the plan's QAT
    fraction is the planner's optimum for the config's model (its served bytes), and QAT
    starts at the step it rounds to."""
    from test_phases import _qat_config

    from qat_jax import sizes
    fitted = law_lib.load_law(REPRO / "law.json")
    assert fitted.form.name == "qat_wsd"
    c = _qat_config(tmp_path, fraction="law")
    c.qat.law_file = str(REPRO / "law.json")
    # the study's 169k model at 3.4M tokens: inside the range the law was fitted to (outside
    # it, e.g. at this config's 100 steps, its plan means nothing: METHOD.md 3c)
    for k, v in {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 176,
                 "vocab_size": 1024}.items():
        setattr(c.model, k, v)
    c.quant.quantize_embedding = True
    c.schedule.total_tokens = 3_400_000
    p = resolve.plan(c)
    n = sizes.param_count(*sizes.specs(c))["total"]
    want, _ = planner.optimal_fraction(fitted, n, p.total_tokens, 4.0,
                                       sizes.served_bytes(*sizes.specs(c), 4.0)["total"])
    assert p.fraction == pytest.approx(want, abs=1e-3)  # the search's tolerance
    steps = p.total_steps
    assert p.qat_start == steps - round(want * steps)
    assert 0.1 < want < 0.5 and p.fraction_note.startswith("law: optimum of")
