"""Do bfloat16 matmul operands give the study the same verdicts as float32? One point of the
full grid (qat_jax/study/grids.py GRIDS["full"]) trained again with
--config.model.matmul_precision=PRECISION on the study's pinned corpus, and compared with the
committed float32 table (docs/repro-float32/runs.jsonl): per bit width the measured optimum f*
and its uncertainty (the committed study's seed noise), the penalty's optimum, where each is
censored at an end of the fraction grid, and the loss differences run by run. The wall time of the
point is recorded beside the committed one. Results go to benchmarks/precision_point.json.

    python benchmarks/precision_point.py --workdir=/tmp/precision --point=xxs2-2.4M
    # about 15 minutes on 2 cores in bfloat16 (the point took 26.5 in float32, shared)

A rerun resumes the point's sweep in --workdir (a sweep resumes run by run).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from qat_jax import files, runconfig, xla_cache
from qat_jax.study import corpus as corpus_lib
from qat_jax.study import grids, measured, repro
from qat_jax.tools import sweep

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "precision_point.json"
STUDY = ROOT / "docs" / "repro-float32"


def train_point(workdir: Path, point: grids.Point, precision: str) -> float:
    """The point's sweep in `precision` on the pinned corpus; its wall seconds in this call."""
    study = files.read_json(STUDY / "repro.json", "restore docs/repro-float32")
    second = study["second_corpus"]
    config = runconfig.load_config_file(str(ROOT / "qat_jax" / "configs" / "repro.py"))
    diffs = runconfig.config_diffs(study["config"], config)
    if diffs:  # the committed study's settings, or the comparison means nothing
        raise SystemExit(f"configs/repro.py differs from the committed study's: {diffs}")
    config = runconfig.config_with(config, **{"model.matmul_precision": precision})
    corpus_lib.build_corpus(workdir, second, config.model.vocab_size)
    corpus_lib.check_corpus(workdir, corpus_lib.corpus_fingerprint(workdir, second),
                            study["corpus"])
    xla_cache.use_compilation_cache(str(workdir / "xla_cache"), 0.5)
    t0 = time.time()
    sweep.run_sweep(grids.point_config(config, point, workdir / "data"),
                    workdir / "sweeps" / point.name, (0.0, *point.fractions), list(point.bits),
                    (True, False) if point.unfused else (True,), set(point.unfused),
                    controls=point.controls, fixed_cooldown=point.fixed_cooldown,
                    fixed_fractions=point.fixed)
    return time.time() - t0


def compare(ours: list[dict], theirs: list[dict], sigma: float) -> dict:
    """Per bit width: f* and the penalty's f* in each precision with f*'s sd, and whether
    they agree (the same censoring, and f* within two combined sd); the loss differences."""
    by_name = {r["name"]: r for r in theirs}
    diffs = np.array([r["loss"] - by_name[r["name"]]["loss"] for r in ours])
    groups = {}
    for label, recs in (("new", ours), ("float32", theirs)):
        for g in measured.groups(recs):
            if "f_measured" not in g:
                continue
            row = groups.setdefault(f"{g['B']:g}", {})
            row[label] = {"f_star": g["f_measured"], "edge": g["edge"],
                          "f_sd": measured.f_uncertainty(g, sigma)["f_sd"],
                          "f_penalty": g.get("f_penalty"), "edge_penalty": g.get("edge_penalty"),
                          "best_loss": g["best_loss"]}
    for row in groups.values():
        a, b = row["new"], row["float32"]
        tol = 2 * math.hypot(a["f_sd"], b["f_sd"])
        row["same_verdict"] = bool(a["edge"] == b["edge"]
                                   and abs(a["f_star"] - b["f_star"]) <= tol)
        row["f_star_tolerance"] = tol
    return {"runs": len(diffs), "mean_loss_diff": float(diffs.mean()),
            "mean_abs_loss_diff": float(np.abs(diffs).mean()),
            "max_abs_loss_diff": float(np.abs(diffs).max()), "by_bits": groups,
            "same_verdicts": all(r["same_verdict"] for r in groups.values())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--point", default="xxs2-2.4M", help="a point of the full grid")
    ap.add_argument("--precision", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args()
    grid = grids.GRIDS["full"]
    point = next((p for p in grid.points if p.name == args.point), None)
    if point is None:
        ap.error(f"--point={args.point!r}; the full grid's points: "
                 f"{[p.name for p in grid.points]}")
    seconds = train_point(args.workdir, point, args.precision)
    ours = repro.collect_records(args.workdir, grids.Grid("one", (point,)))
    table = files.read_jsonl(STUDY / repro.RUNS_FILE, "restore docs/repro-float32")
    theirs = [r for r in table if r["point"] == point.name]
    study = files.read_json(STUDY / repro.STUDY_FILE, "restore docs/repro-float32")
    sigma = measured.seed_noise(table)["sigma"]
    result = {"point": point.name, "precision": args.precision, "seed_noise": sigma,
              "seconds_this_call": seconds,
              "float32_seconds": study["timing"]["points"].get(point.name),
              "processor": repro._hardware()["processor"],
              **compare(ours, theirs, sigma)}
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    old[f"{point.name}/{args.precision}"] = result
    OUT.write_text(json.dumps(old, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
