"""Does the price of a longer cooldown depend on the model's size because every size trains at
one peak LR? The committed study (docs/repro) trains all sizes at optimizer.peak_lr = 3e-3,
and at equal tokens per parameter its FP controls' loss rise from the shortest to the longest
cooldown differs by size (REPORT.md, "Where the chosen law misses"). This probe trains points of
the full grid (seed 0) again at other peak LRs, on the study's pinned corpus and settings
(qat_jax/configs/repro.py, checked against docs/repro/repro.json): per point and LR, the FP-only
run (its own 20% cooldown), the schedule-matched FP controls of the point's shortest and longest
fused QAT fraction, and 4-bit fused QAT at those fractions. Results go to
benchmarks/lr_probe.json; `--table` prints them as the markdown table that
docs/REPRODUCTION.md quotes.

    python benchmarks/lr_probe.py --workdir=/tmp/lrprobe --point=xxs2-0.8M --lr=1e-2
    python benchmarks/lr_probe.py --table

A run at the study's own LR (3e-3) must give the committed table's losses (the runs are
deterministic on one machine class); `--table` shows the difference. A rerun resumes the
sweep in --workdir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qat_jax import files, runconfig, xla_cache
from qat_jax.study import corpus as corpus_lib
from qat_jax.study import grids, repro
from qat_jax.tools import sweep

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "lr_probe.json"
STUDY = ROOT / "docs" / "repro"
BITS = 4.0


def _point(name: str) -> grids.Point:
    points = {p.name: p for p in grids.GRIDS["full"].points}
    if name not in points:
        raise SystemExit(f"--point={name!r}; the full grid's points: {sorted(points)}")
    return points[name]


def train(workdir: Path, point: grids.Point, lr: float) -> tuple[list[dict], float]:
    """The point's probe sweep at peak LR `lr`: its runs.jsonl records and wall seconds."""
    study = files.read_json(STUDY / "repro.json", "restore docs/repro")
    second = study["second_corpus"]
    config = runconfig.load_config_file(str(ROOT / "qat_jax" / "configs" / "repro.py"))
    diffs = runconfig.config_diffs(study["config"], config)
    if diffs:  # the committed study's settings, or the comparison means nothing
        raise SystemExit(f"qat_jax/configs/repro.py differs from the committed study's: {diffs}")
    corpus_lib.build_corpus(workdir, second, config.model.vocab_size)
    corpus_lib.check_corpus(workdir, corpus_lib.corpus_fingerprint(workdir, second),
                            study["corpus"])
    xla_cache.use_compilation_cache(str(workdir / "xla_cache"), 0.5)
    config = runconfig.config_with(grids.point_config(config, point, workdir / "data"),
                                   **{"optimizer.peak_lr": lr})
    fractions = (0.0, min(point.fractions), max(point.fractions))
    t0 = time.time()
    summary = sweep.run_sweep(config, workdir / "sweeps" / f"{point.name}-lr{lr:g}", fractions,
                              [BITS], (True,), controls=True)
    if summary["failed"] or summary["preempted"]:
        raise SystemExit(f"{point.name} at lr {lr:g}: failed {summary['failed']}, "
                         f"preempted {summary['preempted']}")
    return [{k: r[k] for k in ("name", "loss", "fraction", "D_cool", "B")}
            for r in summary["records"]], time.time() - t0


def summarise(point: grids.Point, records: list[dict]) -> dict:
    """The FP run, the controls of the shortest and longest fraction, the 4-bit runs there, and
    the rise and penalties they give."""
    by = {r["name"]: r for r in records}
    fused = sorted((r for r in records if r["B"] == BITS), key=lambda r: r["fraction"])
    short, long_ = fused[0], fused[-1]
    ctrl = {}
    for key, q in (("short", short), ("long", long_)):
        # the control has the QAT run's cooldown; the FP-only run is it where they coincide
        ctrl[key] = next(r for r in records if r["B"] == 16 and r["D_cool"] == q["D_cool"])
    return {"fp": by["fp"]["loss"], "fractions": [short["fraction"], long_["fraction"]],
            "ctrl_short": ctrl["short"]["loss"], "ctrl_long": ctrl["long"]["loss"],
            "rise": ctrl["long"]["loss"] - ctrl["short"]["loss"],
            "qat_short": short["loss"], "qat_long": long_["loss"],
            "penalty_short": short["loss"] - ctrl["short"]["loss"],
            "penalty_long": long_["loss"] - ctrl["long"]["loss"]}


def committed(point: grids.Point) -> list[dict]:
    table = files.read_jsonl(STUDY / repro.RUNS_FILE, "restore docs/repro")
    names = _probe_names(point, table)
    return [r for r in table if r["point"] == point.name and r["name"] in names]


def _probe_names(point: grids.Point, table: list[dict]) -> set[str]:
    lo, hi = min(point.fractions), max(point.fractions)
    recs = [r for r in table if r["point"] == point.name]
    qat = [r for r in recs if r["B"] == BITS and r["fused"] and "cool" not in r["name"]
           and any(abs(r["fraction"] - f) < 0.02 for f in (lo, hi))]
    cools = {r["D_cool"] for r in qat}
    return ({"fp"} | {r["name"] for r in qat}
            | {r["name"] for r in recs if r["B"] == 16 and r["D_cool"] in cools})


def table(results: dict) -> str:
    lines = ["| point | tokens/param | peak LR | FP (20% cooldown) | FP control, shortest "
             "cooldown | longest | rise | 4-bit penalty, shortest | longest |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(results, key=lambda k: (_order(k), results[k]["lr"])):
        r = results[key]
        s = r["summary"]
        lo, hi = s["fractions"]
        lines.append(
            f"| {r['point']} | {r['tokens_per_param']:.1f} | {r['lr']:g}"
            f"{' (study)' if r['source'] == 'docs/repro' else ''} | {s['fp']:.3f} | "
            f"{s['ctrl_short']:.3f} (f {lo:.2f}) | {s['ctrl_long']:.3f} (f {hi:.2f}) | "
            f"{s['rise']:+.3f} | {s['penalty_short']:+.3f} | {s['penalty_long']:+.3f} |")
    checks = [(k, r) for k, r in results.items() if "study_diff" in r]
    for k, r in checks:
        lines.append(f"\nrerun at the study's LR, {k}: largest |loss - committed| "
                     f"{r['study_diff']:.2e} over {r['n_runs']} runs")
    return "\n".join(lines)


def _order(key: str) -> tuple:
    name = key.split("/")[0]
    size = name.split("-")[0]
    return (["xxs2", "xs", "s"].index(size), name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--point", help="a point of the full grid at seed 0, e.g. xs-1.7M")
    ap.add_argument("--lr", type=float, help="the peak LR (optimizer.peak_lr)")
    ap.add_argument("--table", action="store_true", help="print the results as markdown")
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.table:
        print(table(results))
        return
    if args.workdir is None or args.point is None or args.lr is None:
        ap.error("give --workdir, --point and --lr (or --table)")
    point = _point(args.point)
    if point.seed:
        ap.error(f"--point={args.point}: the probe runs seed-0 points")
    base = committed(point)
    n_params = base[0]["N"]
    results[f"{point.name}/lr0.003"] = {
        "point": point.name, "lr": 3e-3, "source": "docs/repro", "n_runs": len(base),
        "tokens_per_param": point.budget / n_params, "summary": summarise(point, base)}
    records, seconds = train(args.workdir, point, args.lr)
    out = {"point": point.name, "lr": args.lr, "source": "this probe", "n_runs": len(records),
           "tokens_per_param": point.budget / n_params, "seconds": seconds,
           "processor": repro._hardware()["processor"],
           "summary": summarise(point, records), "records": records}
    if abs(args.lr - 3e-3) < 1e-12:  # the study's LR: the committed losses again
        by = {r["name"]: r["loss"] for r in base}
        out["study_diff"] = max(abs(r["loss"] - by[r["name"]]) for r in records)
        results[f"{point.name}/lr0.003-rerun"] = out
    else:
        results[f"{point.name}/lr{args.lr:g}"] = out
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
