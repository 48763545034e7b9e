import numpy as np
import pytest
from test_lawsched import SCHED_TRUTH, _sched_records

from qat_jax import law as law_lib
from qat_jax.law import planner
from qat_jax.study import lawstudy, measured


def _records(truth, **kw):
    rows = _sched_records(truth, **kw)
    for r in rows:
        r["size"] = f"n{r['N']:g}"
        r["fraction"] = r["D_qat"] / (r["D_fp"] + r["D_qat"])
    return rows


def test_quality_of_the_truth_and_of_a_wrong_law():
    """On runs drawn from a law, that law has no within-group error, every optimum interior
    and its f* where the runs' parabolas put it (within their fraction grid's resolution); the
    same law with the schedule term switched off (C -> 0) puts every optimum elsewhere and
    misfits each U curve."""
    truth = law_lib.Law(law_lib.qat_schedule, SCHED_TRUTH)
    rows = _records(truth)
    q = lawstudy.quality(truth, rows)
    assert q["within_rmse"] < 1e-9 and q["interior"] == q["groups"] == 12
    assert q["f_mae"] < 0.03 and q["signs"]["xi"] == SCHED_TRUTH["xi"]
    flat = law_lib.Law(law_lib.qat_schedule, {**SCHED_TRUTH, "log_c": -30.0})
    q_flat = lawstudy.quality(flat, rows)
    assert q_flat["within_rmse"] > 0.005
    held = lawstudy.quality(truth, rows, truth, "n40000")
    assert held["holdout_mean_rel_err"] < 1e-9


def test_penalty_optima_and_fixed_cooldown_groups():
    """Each group's penalties are its fused losses minus their controls'; their optimum is the
    truth's optimum with the cooldown's length held fixed."""
    truth = law_lib.Law(law_lib.qat_schedule, SCHED_TRUTH)
    rows = _records(truth, sizes=(1.6e5,), budgets=(2e6,))
    gs = measured.groups(rows)
    by = {(r["point"], r["name"]): r["loss"] for r in rows}
    for g in gs:
        assert len(g["penalty"]) == len(g["fused"]) == 7
        for (f, p), (f2, loss) in zip(g["penalty"], g["fused"], strict=True):
            ctrl = by[g["point"], "fp" if abs(f - 0.2) < 1e-9 else f"fp-c{f:g}"]
            assert f == f2 and p == pytest.approx(loss - ctrl)
        # the truth's penalty alone: minimised over the same grid
        fs = np.linspace(0.05, 0.8, 301)
        pen = (planner.split_loss(truth, g["N"], g["D"], g["B"], fs)
               - np.array([float(truth(g["N"], g["D"], 0.0, 16.0, None, f * g["D"]))
                           for f in fs]))
        assert g["f_penalty"] == pytest.approx(fs[np.argmin(pen)], abs=0.08)
    assert len(measured.penalty_groups(gs, 0.004)) == len(gs)


def test_pooled_within_group_rmse_averages_a_points_seeds():
    """Two seeds of one point whose losses lean opposite ways about the truth's U curves: per
    seed each curve misfits, pooled (a run's residuals averaged over its seeds first) the
    law fits exactly; one seed alone pools to its own misfit."""
    truth = law_lib.Law(law_lib.qat_schedule, SCHED_TRUTH)
    rows = _records(truth, sizes=(1.6e5,), budgets=(2e6,))
    seeds = []
    for seed, sign in ((0, 1.0), (1, -1.0)):
        for r in rows:
            f = r["D_qat"] / (r["D_fp"] + r["D_qat"])
            lean = sign * 0.1 * (f - 0.4) if r["B"] < law_lib.FP_BITS else 0.0
            seeds.append({**r, "seed": seed, "point": f"{r['point']}-s{seed}", "budget": 2e6,
                          "loss": r["loss"] + lean})
    q = lawstudy.quality(truth, seeds)
    assert q["within_rmse"] > 0.003 and q["within_rmse_pooled"] < 1e-9
    one = lawstudy.quality(truth, [r for r in seeds if r["seed"] == 0])
    assert one["within_rmse_pooled"] == pytest.approx(one["within_rmse"])
    # The seed-averaged runs are the truth's (the leans cancel), named by the first seed; their
    # optima are the truth's own, so f* errs less against them than against each seed's.
    means = measured.seed_means(seeds)
    assert len(means) == len(rows) and all(m["seeds"] == 2 for m in means)
    by_name = {r["name"]: r["loss"] for r in rows}
    for m in means:
        assert m["point"].endswith("-s0") and m["loss"] == pytest.approx(by_name[m["name"]])
    alone = lawstudy.quality(truth, rows)
    assert q["f_mae_pooled"] == pytest.approx(alone["f_mae"], abs=1e-9)
    assert q["f_mae"] > q["f_mae_pooled"] + 0.005
    assert one["f_mae_pooled"] == pytest.approx(one["f_mae"])


def test_a_degenerate_fit_is_reported_not_a_crash():
    """`qat-jax repro --quick` (two points, one per size) once fitted the paper's form with a
    coefficient's log past 709, and the report died on exp() overflowing. A law's natural
    parameters are inf there, and the study's quality numbers read them."""
    import math

    from test_law import QAT_TRUTH

    law = law_lib.Law(law_lib.qat, {**QAT_TRUTH, "log_theta": 800.0})
    natural = law.natural()
    assert natural["theta"] == math.inf and natural["E"] == pytest.approx(math.exp(QAT_TRUTH["e"]))
    tpp = law_lib.qat_wsd.with_options(anneal_tpp=True)
    wsd = law_lib.Law(tpp, {**{k: 0.1 for k in tpp.params}, "log_g": 1000.0})
    assert wsd.natural()["g"] == math.inf and wsd.natural()["upsilon"] == 0.1


def test_within_noise_floor_is_what_noise_leaves_the_true_law():
    """Runs of a known law at two seeds, each run's loss with independent noise sigma: the true
    law's within-group RMSE, per seed and pooled, is the floor `within_noise_floor` gives
    (within the scatter of an estimate from 168 runs), and pooling two seeds lowers it by
    about sqrt(2)."""
    truth = law_lib.Law(law_lib.qat_schedule, SCHED_TRUTH)
    rows = _records(truth)
    rng = np.random.default_rng(3)
    sigma, runs = 0.01, []
    for seed in (0, 1):
        for r in rows:
            noise = sigma * rng.standard_normal() if r["B"] < law_lib.FP_BITS else 0.0
            runs.append({**r, "seed": seed, "budget": r["D_fp"] + r["D_qat"],
                         "point": f"{r['point']}-s{seed}", "loss": r["loss"] + noise})
    q = lawstudy.quality(truth, runs)
    gs = measured.groups(measured.law_records(runs))
    per_seed, pooled = measured.within_noise_floor(gs, sigma)
    assert per_seed == pytest.approx(sigma * np.sqrt(6 / 7))  # 7 fractions a group
    assert pooled == pytest.approx(per_seed / np.sqrt(2))
    assert q["within_rmse"] == pytest.approx(per_seed, rel=0.15)
    assert q["within_rmse_pooled"] == pytest.approx(pooled, rel=0.2)
    one = measured.within_noise_floor([g for g in gs if g["seed"] == 0], sigma)
    assert one[0] == one[1] == pytest.approx(per_seed)  # one seed: nothing to pool


def test_the_chosen_variant_places_the_optimum_then_predicts_best():
    """A variant whose optima are off (f* MAE over 0.06) or at an end is passed over however
    well it predicts the held-out size; among the rest the least held-out error wins, and with
    none eligible, still the least held-out error."""
    def q(interior, f_mae, held, within=0.01):
        return {"groups": 30, "interior": interior, "f_mae": f_mae,
                "holdout_mean_rel_err": held, "within_rmse": within}

    assert lawstudy.choose({"paper": q(30, 0.104, 0.0127), "wsd": q(30, 0.046, 0.019),
                            "wsd2": q(30, 0.049, 0.083)}) == "wsd"
    assert lawstudy.choose({"edge": q(20, 0.01, 0.001), "ok": q(28, 0.06, 0.05)}) == "ok"
    assert lawstudy.choose({"a": q(30, 0.2, 0.03), "b": q(10, 0.01, 0.02)}) == "b"
    no_held = {"a": q(30, 0.05, 0, within=0.02), "b": q(30, 0.05, 0, within=0.01)}
    for v in no_held.values():  # no size held out: the U curves' fit decides
        v.pop("holdout_mean_rel_err")
    assert lawstudy.choose(no_held) == "b"


def test_a_nested_variant_starts_from_its_special_case_too():
    """The WSD law with its annealing exponent starts from its own grid and from the fitted
    law without it (upsilon = 0), in its own parameter order."""
    truth = law_lib.Law(law_lib.qat_schedule, SCHED_TRUTH)
    rows = _records(truth)
    for r in rows:
        r["D_cool"] = r.get("D_cool", 0.2 * (r["D_fp"] + r["D_qat"]))
    form = law_lib.get_form("qat_wsd").with_options(pin_fp=False, anneal_tpp=True)
    inner_form = law_lib.get_form("qat_wsd").with_options(pin_fp=False, anneal_tpp=False)
    rng = np.random.default_rng(0)
    inner = law_lib.Law(inner_form, {n: float(rng.uniform(0.1, 1)) for n in inner_form.params})
    starts = lawstudy._nested_starts(form, rows, inner, {"upsilon": 0.0})["starts"]
    runs = law_lib.Runs.from_records(measured.law_records(rows))
    assert starts.shape == (len(form.grid(runs, {}, law_lib.fit)) + 1, len(form.params))
    last = dict(zip(form.params, starts[-1], strict=True))
    assert last == {**inner.params, "upsilon": 0.0}
    assert lawstudy._nested_starts(form, rows, None, {"upsilon": 0.0}) == {}
