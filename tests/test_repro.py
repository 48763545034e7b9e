import json
from pathlib import Path

import numpy as np
import pytest

from qat_jax import claims, plots, repro
from qat_jax import law as law_lib

# A grid at an even smaller size than --quick: 2 budgets x (2 bits x 2 fractions + FP), and the
# unfused runs at one budget: 14 runs, too few for the 16-parameter law (tested on its own below).
TEST_GRID = repro.Grid("test", ("xxs",), (8_192, 32_768), (0.25, 0.75),
                       unfused_at=("xxs", 8_192))
POINTS = {"xxs-0.008192M", "xxs-0.032768M"}


def _record(point, size, N, D, B, f, loss, fused=True):
    return {"point": point, "size": size, "budget": D, "N": N, "D_fp": (1 - f) * D,
            "D_qat": f * D, "B": B, "loss": loss, "fused": fused}


def test_measured_optimum_and_claim_verdicts():
    """Hand-made runs in which every claim holds: the optimum grows with the budget, 2-bit
    needs more QAT than 4-bit, and fusing helps at 4 bits only."""
    grid = repro.Grid("t", ("a",), (1000, 10000), (0.1, 0.3, 0.5, 0.7), unfused_at=("a", 1000))
    records = []
    for D, centre in ((1000, 0.25), (10000, 0.45)):
        point = f"a-{D}"
        records.append(_record(point, "a", 100, D, 16.0, 0.0, 2.0))
        for B, shift in ((2.0, 0.1), (4.0, 0.0)):
            for f in grid.fractions:
                loss = 2.1 + (f - centre - shift) ** 2
                records.append(_record(point, "a", 100, D, B, f, loss))
                if D == 1000:
                    records.append(_record(point, "a", 100, D, B, f,
                                           loss + (0.01 if B == 4.0 else 0.0), fused=False))
    out = claims.evaluate(records, None, None, grid)
    by = {(g["point"], g["B"]): g for g in out["groups"]}
    # The parabola through the best run and its neighbours: its vertex is the centre here.
    assert by["a-1000", 4.0]["f_measured"] == pytest.approx(0.25)
    assert by["a-10000", 2.0]["f_measured"] == pytest.approx(0.55)
    assert by["a-1000", 4.0]["S"] == pytest.approx(1000 / (100 * 4 / 8))
    c = out["claims"]
    assert c["1"]["spearman_S_f"] > 0.5 and c["1"]["budget_steps_up"] == 2
    assert c["1"]["verdict"] == "holds"
    assert c["4"]["gains"]["4"]["mean_gain"] == pytest.approx(0.01)
    assert c["4"]["gains"]["2"]["mean_gain"] == pytest.approx(0.0)
    assert c["4"]["verdict"] == "holds"
    assert c["5"]["fewer_bits_larger"] == 2 and c["5"]["verdict"] == "holds"
    assert c["4"]["gains"]["4"]["best_gain"] == pytest.approx(0.01)  # unfused - fused
    assert c["3"]["verdict"] == "does not hold"  # no law
    assert c["1"]["optima_at_edge"] == 0

    # Every optimum at the smallest fraction (censored); fractions off by step rounding tie.
    edge = [dict(r, loss=2.0 + r["D_qat"] / r["budget"] + (0.003 if r["B"] == 2.0 else 0),
                 D_qat=r["D_qat"] * (1.03 if r["budget"] == 1000 else 1.0))
            for r in records if r["fused"]]
    out = claims.evaluate(edge, None, None, grid)
    assert all(g["edge"] == "lowest" for g in out["groups"])
    c = out["claims"]
    assert c["1"]["budget_steps_up"] == c["1"]["budget_steps_down"] == 0
    assert np.isnan(c["1"]["spearman_S_f"]) and c["1"]["verdict"] == "does not hold"
    assert c["2"]["optima_at_edge"] == 4 and c["2"]["verdict"] != "holds"
    assert c["5"]["equal"] == 2 and c["5"]["verdict"] == "does not hold"


def test_best_bits_plot_clips_far_off_losses():
    memory = [{"rows": [{"B": 2.0, "loss": 3.0}, {"B": 4.0, "loss": 3.2},
                        {"B": 16.0, "loss": 9.0}]},
              {"rows": [{"B": 3.0, "loss": 2.5}, {"B": 16.0, "loss": 2.6}]}]
    lo, hi = plots.best_bits_ylim(memory)
    assert lo == pytest.approx(2.45) and hi == pytest.approx(4.0)  # 9.0 is clipped, optima kept


def test_bad_starts_rejected(tmp_path):
    from configs import repro as repro_config

    config = repro_config.get_config()
    with pytest.raises(repro.ReproError, match="unknown size 'huge'"):
        repro._check_start(tmp_path, repro.Grid("g", ("huge",), (1,), (0.5,)), "none", config)
    with pytest.raises(repro.ReproError, match="--second_corpus='nowhere/\\*.txt': one of"):
        repro._check_start(tmp_path, TEST_GRID, "nowhere/*.txt", config)
    repro._check_start(tmp_path / "w", TEST_GRID, "none", config)
    with pytest.raises(repro.ReproError, match="started otherwise.*grid: "):
        repro._check_start(tmp_path / "w", repro.GRIDS["quick"], "none", config)
    with pytest.raises(repro.ReproError, match="second_corpus: none -> pydoc-topics"):
        repro._check_start(tmp_path / "w", TEST_GRID, "pydoc-topics", config)
    other = config.copy_and_resolve_references()
    with other.unlocked():
        other.data.batch_size = 64
        other.logging.every_steps = 7  # logging may change on a resume
    only_batch = r"Differences: --config.data.batch_size: 16 -> 64\. Rerun"
    with pytest.raises(repro.ReproError, match=only_batch):
        repro._check_start(tmp_path / "w", TEST_GRID, "none", other)
    with other.unlocked():
        other.data.batch_size = 16
    repro._check_start(tmp_path / "w", TEST_GRID, "none", other)  # the same study: resumes


def test_preempted_repro_stops_and_says_so(tmp_path, monkeypatch, cache_dir):
    """SIGTERM during a point's sweep: the repro runs no further point, and the report it
    writes from what is finished says it is incomplete."""
    calls = []

    def fake_sweep(config, workdir, fractions, bits, modes):
        calls.append((Path(workdir).name, modes))
        timing = json.loads((tmp_path / "w" / "timing.json").read_text())
        assert timing["sessions"] == 1  # counted before any work, so a kill keeps it
        return {"preempted": True, "failed": {}}

    meta = {"splits": {"train": {"tokens": 10**6}}}
    monkeypatch.setattr(repro, "build_corpus", lambda *a: meta)
    monkeypatch.setattr(repro.sweep, "run_sweep", fake_sweep)
    from conftest import small_config

    report = repro.run(small_config(cache_dir), tmp_path / "w", TEST_GRID, "none")
    assert calls == [("xxs-0.008192M", (True, False))]  # the unfused point: both modes
    assert report["preempted"] and report["n_runs"] == 0
    assert report["timing"]["sessions"] == 1 and report["timing"]["seconds"] > 0
    assert "**Incomplete**: preempted=True" in (tmp_path / "w" / "REPORT.md").read_text()


def _context(grid):
    return {"grid": grid.to_json(), "second_corpus": "none", "epochs": {},
            "corpus": {"splits": {"train": {"tokens": 0}}}, "preempted": False, "failed": {},
            "timing": {"seconds": 1.0, "sessions": 1}, "hardware": {"cpu_count": 2,
                                                                    "backend": "cpu",
                                                                    "processor": ""},
            "compute": {"tokens": 1.0, "flops": 1.0, "tokens_from_scratch": 2.0,
                        "flops_from_scratch": 2.0, "saved_frac": 0.5}}


@pytest.mark.slow
def test_report_on_runs_drawn_from_a_known_law(tmp_path):
    """Runs whose losses are a known QAT law (noise-free) over a repro-shaped grid at the
    paper's scale: the report's law fits them, predicts the held-out point, and its optima and
    the measured ones agree with the truth's."""
    from test_law import QAT_TRUTH

    from qat_jax import planner

    truth = law_lib.Law(law_lib.qat, QAT_TRUTH)
    sizes = {"m": 3e8, "l": 1e9}
    grid = repro.Grid("known", tuple(sizes), (2e10, 6e10, 2e11), (0.05, 0.1, 0.2, 0.35, 0.5, 0.8),
                      unfused_at=("m", 6e10), holdout=("l", 2e11))
    records = []
    for size, budget in grid.points():
        point, N = repro.point_name(size, budget), sizes[size]
        fp = float(truth(np.array(N), np.array(budget), np.array(0.0), np.array(16.0)))
        records.append(_record(point, size, N, budget, 16.0, 0.0, fp))
        for B in grid.bits:
            for f in grid.fractions:
                loss = float(truth(np.array(N), np.array((1 - f) * budget),
                                   np.array(f * budget), np.array(B)))
                records.append(_record(point, size, N, budget, B, f, loss))
                if (size, budget) == grid.unfused_at:  # unfused: worse at 4 bits only
                    records.append(_record(point, size, N, budget, B, f,
                                           loss + (0.01 if B == 4.0 else 0.0), fused=False))
    report = claims.write_report(tmp_path, records, grid, _context(grid))
    c = report["claims"]
    assert report["law"]["r2"] > 0.999 and c["3"]["n_runs"] == 78
    assert c["3"]["holdout_runs"] == 13 and c["3"]["holdout_mean_rel_err"] < 0.002
    assert c["3"]["verdict"] == "holds" and c["4"]["verdict"] == "holds"
    for g in report["groups"]:
        f_true = planner.optimal_fraction(truth, g["N"], g["D"], g["B"])[0]
        assert g["f_law"] == pytest.approx(f_true, abs=0.02)
        if g["edge"] is None:  # the parabola through three runs: near the truth's optimum
            assert g["f_measured"] == pytest.approx(f_true, abs=0.06)
    # The truth's optimum grows with the budget along each (size, B).
    assert c["1"]["budget_steps_up"] == c["1"]["budget_steps"] == 8
    assert c["1"]["verdict"] == c["5"]["verdict"] == "holds"  # and 2 bits need more QAT
    assert json.loads((tmp_path / "law.json").read_text())["form"] == "qat"
    assert [m["rows"][0]["B"] for m in report["memory"]]  # a best bit width per budget
    for name in ("loss_vs_fraction", "optimal_fraction_vs_S", "fused_vs_unfused",
                 "best_bits_under_memory"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "REPORT.md").read_text()
    assert "**Claim 3: holds.**" in text and "Fitted law: E " in text


@pytest.mark.slow
def test_repro_end_to_end_and_resume(tmp_path, cache_dir):
    from conftest import small_config

    config = small_config(cache_dir)
    with config.unlocked():
        config.data.eval_batches = 4
        config.logging.eval_every_steps = 10_000
        config.checkpoint.every_steps = 1000
    work = tmp_path / "study"
    report = repro.run(config, work, TEST_GRID, "pydoc-topics")
    assert report["n_runs"] == 14 and not report["failed"] and not report["preempted"]
    runs = [json.loads(x) for x in (work / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 14 and {r["point"] for r in runs} == POINTS
    assert sum(not r["fused"] and r["B"] < 16 for r in runs) == 4
    assert sum(r["B"] >= 16 for r in runs) == 2
    # Each measured optimum is the best fused run's fraction or lies between its neighbours.
    for g in report["groups"]:
        fs, losses = np.array(g["fused"]).T
        i = int(np.argmin(losses))
        assert fs[max(i - 1, 0)] <= g["f_measured"] <= fs[min(i + 1, len(fs) - 1)]
        assert g["best_loss"] == losses.min() and len(fs) == 2
    assert len(report["groups"]) == 4
    c = report["claims"]
    assert set(c) == {"1", "2", "3", "4", "5"}
    assert all(x["verdict"] in ("holds", "partly", "does not hold") for x in c.values())
    assert report["law"] is None and c["3"]["n_runs"] == 0  # 10 runs: too few to fit
    assert set(c["4"]["gains"]) == {"2", "4"} and c["4"]["gains"]["4"]["fractions"] == 2
    comp = report["compute"]
    assert 0 < comp["tokens"] < comp["tokens_from_scratch"]
    assert comp["saved_frac"] == pytest.approx(1 - comp["tokens"] / comp["tokens_from_scratch"])
    for name in ("loss_vs_fraction", "optimal_fraction_vs_S", "fused_vs_unfused"):
        assert (work / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    text = (work / "REPORT.md").read_text()
    assert "**Claim 2:" in text and "branching saved" in text
    assert report["epochs"]["xxs-0.032768M"] < 0.1

    # A rerun finds everything done: nothing is trained again.
    mtimes = {p: p.stat().st_mtime for p in (work / "sweeps").rglob("result.json")}
    again = repro.run(config, work, TEST_GRID, "pydoc-topics")
    assert again["n_runs"] == 14 and again["timing"]["sessions"] == 2
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    # A budget beyond the corpus's epoch limit is refused before any training.
    big = repro.Grid("test", ("xxs",), (10**9,), (0.5,))
    with pytest.raises(repro.ReproError, match="epochs of the"):
        repro.run(config, tmp_path / "big", big, "pydoc-topics")


def test_memory_plan_uses_the_smallest_models_bytes():
    records = [_record("p", "xs", 1000, 1e5, 4.0, 0.5, 3.0), _record("p", "s", 4000, 1e5, 4.0,
                                                                     0.5, 2.9)]
    records[0]["model_bytes"] = 1000.0  # twice N B / 8 = 500
    records[1]["model_bytes"] = 6000.0
    ratio = claims.byte_ratios(records)
    assert ratio(4.0) == 2.0 and ratio(2.0) == 1.0  # no 2-bit record: the paper's rule
