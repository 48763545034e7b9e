"""What the study's runs measure and what the claims' rules make of them, on hand-made runs:
each claim's verdict where it holds, fails or lacks evidence, the seed noise and f*'s
uncertainty, the memory check and its plan. `_record` makes one run's record (test_repro
uses it too)."""

import numpy as np
import pytest

from qat_jax.study import claims, measured
from qat_jax.study import plots as repro_plots


def _record(point, size, N, D, B, f, loss, fused=True, seed=0, M=None):
    name = "fp" if B >= 16 else f"b{B:g}-f{f:g}-{'fused' if fused else 'unfused'}"
    return {"point": point, "size": size, "budget": D, "N": N, "D_fp": (1 - f) * D,
            "D_qat": f * D, "B": B, "loss": loss, "fused": fused, "seed": seed, "name": name,
            "model_bytes": M}


FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8)


def _study(centre, fusion_gain, sizes=(("a", 1e3), ("b", 3e3), ("c", 1e4)),
           budgets=(1e5, 1e6), bits=(2.0, 4.0, 6.0), unfused_points=2, curvature=2.0):
    """Hand-made runs: loss = base + curvature (f - centre(S, B))^2 with S = D / (N B / 8), and
    unfused runs (loss + fusion_gain(B, point index)) at the first `unfused_points` points."""
    records, k = [], 0
    for size, N in sizes:
        for D in budgets:
            point = f"{size}-{D:g}"
            base = 2.0 + 1e3 / N ** 0.5 + 30 / D ** 0.3
            records.append(_record(point, size, N, D, 16.0, 0.0, base - 0.01))
            for B in bits:
                S = D / (N * B / 8)
                for f in FRACTIONS:
                    loss = base + curvature * (f - centre(S, B)) ** 2 + 0.02 / B
                    records.append(_record(point, size, N, D, B, f, loss))
                    if k < unfused_points and f in (0.1, 0.2, 0.35, 0.5):
                        records.append(_record(point, size, N, D, B, f,
                                               loss + fusion_gain(B, k), fused=False))
            k += 1
    return records


def _grows(S, B):
    return float(np.exp(-3.6 / np.log(S)))  # the paper's curve with another constant


def _paper_fusion(B, k):
    return 0.02 if B >= 4 else 0.0


def test_claims_hold_on_runs_made_to_hold():
    """Hand-made runs in which every claim (but the law's, with no law) holds: the optimum
    grows with S on one curve for every bit width (so fewer bits, larger f*), and fusing helps
    at 4 and 6 bits only."""
    out = claims.evaluate(_study(_grows, _paper_fusion), None, None, None)
    by = {(g["point"], g["B"]): g for g in out["groups"]}
    g = by["a-100000", 4.0]
    assert g["S"] == pytest.approx(1e5 / (1e3 * 4 / 8))
    assert g["f_measured"] == pytest.approx(_grows(g["S"], 4.0), abs=0.02)  # the parabola
    assert g["f_lo"] <= g["f_measured"] <= g["f_hi"] and 0 < g["f_sd"] < 0.05
    c = out["claims"]
    assert c["1"]["verdict"] == "holds", c["1"]
    assert c["1"]["resolved_up"] > 0 and c["1"]["resolved_down"] == 0
    assert c["2"]["one_curve"] and set(c["2"]["a_per_bits"]) == {"2", "4", "6"}
    assert c["3"]["verdict"] == "not enough evidence"  # no law
    assert c["4"]["verdict"] == "holds", c["4"]
    gains = {(r["point"], r["B"]): r for r in c["4"]["gains"]}
    assert gains["a-100000", 4.0]["mean_gain"] == pytest.approx(0.02)
    assert gains["a-100000", 4.0]["status"] == "helps"
    # The best runs compared at the fractions both schedules ran (0.1 to 0.5), not the fused
    # best of all seven fractions against the unfused best of four.
    assert gains["a-100000", 4.0]["best_gain"] == pytest.approx(0.02)
    assert gains["a-1e+06", 2.0]["best_gain"] == pytest.approx(0.0)
    assert gains["a-1e+06", 2.0]["status"] == "neutral"
    assert c["5"]["verdict"] == "holds" and c["5"]["fewer_bits_smaller"] == 0
    assert out["sigma"] == {"value": measured.DEFAULT_SIGMA, "measured": False}


def test_claims_on_contradicting_runs():
    """Runs that contradict each claim: the optimum falls with S, fusing helps at 2 bits as
    much as at 4 (and hurts at 6), and every verdict says so."""
    def falls(S, B):
        return float(np.clip(0.7 - 0.12 * np.log10(S), 0.1, 0.7))

    out = claims.evaluate(_study(falls, lambda B, k: 0.0 if B == 6 else 0.02), None, None, None)
    c = out["claims"]
    assert c["1"]["verdict"] == "does not hold" and c["1"]["spearman_S_f"] < 0
    assert c["4"]["verdict"] == "does not hold"  # 2 bits gain as much as 4; 6 bits no gain
    assert c["5"]["verdict"] == "does not hold" and c["5"]["fewer_bits_larger"] == 0


def test_fusion_is_judged_per_point_not_per_bit_width():
    """At 4 bits fusing helps at one point and hurts at the other: the claim cannot hold (the
    old rule kept one gain per bit width, the last point's)."""
    def mixed(B, k):
        return (0.02 if k == 0 else -0.02) if B >= 4 else 0.0

    c = claims.evaluate(_study(_grows, mixed), None, None, None)["claims"]["4"]
    status = {(r["point"], r["B"]): r["status"] for r in c["gains"]}
    assert status["a-100000", 4.0] == "helps" and status["a-1e+06", 4.0] == "hurts"
    assert c["verdict"] == "partly" and c["points_per_bits"] == {"2": 2, "4": 2, "6": 2}


def test_thin_evidence_is_said_so():
    """One point, one unfused point per width, or optima at the grid's edge: every claim says
    'not enough evidence' rather than a verdict."""
    one = _study(_grows, _paper_fusion, sizes=(("a", 1e3),), budgets=(1e5,), unfused_points=1)
    c = claims.evaluate(one, None, None, None)["claims"]
    assert {k: x["verdict"] for k, x in c.items()} == dict.fromkeys("12345", claims.THIN)
    assert measured.fit_law(one, "one size") is None  # its N terms cannot be pinned
    # Every optimum at the smallest fraction: censored, so left out of every rule.
    edge = _study(lambda S, B: 0.0, _paper_fusion)
    out = claims.evaluate(edge, None, None, None)
    assert all(g["edge"] == "lowest" for g in out["groups"])
    assert out["claims"]["1"]["verdict"] == claims.THIN and out["claims"]["1"]["interior"] == 0
    assert out["claims"]["2"]["verdict"] == out["claims"]["5"]["verdict"] == claims.THIN


def test_seed_noise_and_f_uncertainty():
    """A second seed whose runs differ by a common shift plus known scatter: sigma is the
    scatter over sqrt(2) (the shift does not move f*), and f*'s uncertainty grows with it."""
    runs = _study(_grows, _paper_fusion, sizes=(("a", 1e3),), budgets=(1e5,), unfused_points=0)
    rng = np.random.default_rng(0)
    scatter = 0.01 * rng.standard_normal(len(runs))
    again = [dict(r, point=r["point"] + "-seed1", seed=1, loss=r["loss"] + 0.05 + e)
             for r, e in zip(runs, scatter, strict=True)]
    noise = measured.seed_noise(runs + again)
    q = [e for r, e in zip(runs, scatter, strict=True) if r["B"] < 16]
    assert noise["runs"] == len(runs) and noise["mean_shift"] == pytest.approx(0.05, abs=0.005)
    assert noise["sigma"] == pytest.approx(0.01 / np.sqrt(2), rel=0.3)
    assert noise["sd_diff"] == pytest.approx(np.std(scatter, ddof=1), rel=1e-6)
    assert {(x["point"], x["repeat"], x["B"]) for x in noise["f_star_by_seed"]} == {
        (runs[0]["point"], runs[0]["point"] + "-seed1", b) for b in (2.0, 4.0, 6.0)}
    assert len(q) == 21
    assert noise["by_point"] == {runs[0]["point"] + "-seed1": {
        k: noise[k] for k in ("runs", "sigma", "mean_shift", "sd_diff", "max_abs_diff")}}
    # Two repeated points: each its own figures, and the pooled sigma between theirs.
    other = [dict(r, size="b", point="b-1", loss=r["loss"] + 0.1) for r in runs]
    again_b = [dict(r, point="b-1-seed1", seed=1, loss=r["loss"] + 0.03 * e / 0.01)
               for r, e in zip(other, scatter[::-1], strict=True)]
    both = measured.seed_noise(runs + again + other + again_b)
    assert set(both["by_point"]) == {runs[0]["point"] + "-seed1", "b-1-seed1"}
    sig = sorted(v["sigma"] for v in both["by_point"].values())
    assert sig[0] < both["sigma"] < sig[1] and sig[1] > 2 * sig[0]
    assert len(both["f_star_by_seed"]) == 6
    # Repeated runs one per group: no scatter about a shift to measure.
    one_each = [dict(r, point="z-seed1", seed=1) for r in runs if r["name"].endswith("f0.5-fused")]
    assert measured.seed_noise(runs + one_each) is None
    g = next(g for g in measured.groups(runs) if g["B"] == 4.0)
    assert measured.f_uncertainty(g, 0.0)["f_sd"] < 1e-12
    assert measured.f_uncertainty(g, 0.05)["f_sd"] > measured.f_uncertainty(g, 0.005)["f_sd"] > 0
    assert measured.seed_noise(runs) is None  # no second seed: nothing measured
    out = claims.evaluate(runs + again, None, None, None, noise)
    assert out["sigma"] == {"value": noise["sigma"], "measured": True}
    assert {g["seed"] for g in out["groups"]} == {0, 1}
    assert out["claims"]["1"]["optima"] == 3  # the second seed's optima are not counted twice


def test_memory_check_compares_models_of_equal_bytes():
    """Models within 2% of each other's served bytes at one budget form a class; each is
    ranked by its trained loss (FP-only for 16 bits) and by the law."""
    recs = [_record("x-1", "x", 1000, 1e5, 16.0, 0.0, 3.00, M=2000.0),
            _record("y-1", "y", 4000, 1e5, 4.0, 0.2, 2.90, M=2010.0),
            _record("y-1", "y", 4000, 1e5, 4.0, 0.4, 2.95, M=2010.0),
            _record("z-1", "z", 8000, 1e5, 2.0, 0.2, 2.97, M=1990.0),
            _record("z-1", "z", 8000, 1e5, 2.0, 0.4, 2.93, M=1990.0),
            _record("w-1", "w", 9000, 1e5, 2.0, 0.2, 2.50, M=5000.0),  # heavier: not compared
            _record("w-1", "w", 9000, 1e5, 2.0, 0.4, 2.40, M=5000.0)]
    gs = [g for g in measured.groups(recs) if "f_measured" in g]
    (check,) = claims.memory_check(gs, recs, None)
    assert check["order_trained"] == [4.0, 2.0, 16.0] and check["best_trained_B"] == 4.0
    assert [r["trained"] for r in check["rows"]] == [2.90, 2.93, 3.00]


def test_best_bits_plot_clips_far_off_losses():
    memory = [{"rows": [{"B": 2.0, "loss": 3.0}, {"B": 4.0, "loss": 3.2},
                        {"B": 16.0, "loss": 9.0}]},
              {"rows": [{"B": 3.0, "loss": 2.5}, {"B": 16.0, "loss": 2.6}]}]
    lo, hi = repro_plots.best_bits_ylim(memory)
    assert lo == pytest.approx(2.45) and hi == pytest.approx(4.0)  # 9.0 is clipped, optima kept
    lo, _ = repro_plots.best_bits_ylim(memory, [{"rows": [{"trained": 2.3}]}])
    assert lo == pytest.approx(2.25)  # a trained run below the law's curve stays in view


def test_memory_plan_uses_the_smallest_models_bytes():
    records = [_record("p", "xs", 1000, 1e5, 4.0, 0.5, 3.0), _record("p", "s", 4000, 1e5, 4.0,
                                                                     0.5, 2.9)]
    records[0]["model_bytes"] = 1000.0  # twice N B / 8 = 500
    records[1]["model_bytes"] = 6000.0
    ratio = measured.byte_ratios(records)
    assert ratio(4.0) == 2.0 and ratio(2.0) == 1.0  # no 2-bit record: the paper's rule
