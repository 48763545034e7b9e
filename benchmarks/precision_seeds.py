"""Is bfloat16 the better default on a CPU with bfloat16 dot instructions? Issue 32's rule: the
tiny config (`qat-jax train`'s default) trained at SEEDS seeds in each precision; bfloat16
matmul operands become the default if their mean validation loss is within the float32 seeds'
spread (their range) and within MAX_DIFF nats of the float32 mean. Results (each run's
validation loss and wall seconds, this machine's CPU) go to benchmarks/precision_seeds.json;
the verdict is printed and recorded there.

    python benchmarks/precision_seeds.py --workdir=/tmp/precision_seeds
    # about 45 minutes on 2 cores (float32 ~5.4 min a run, bfloat16 ~3.1)

The float32 runs take XLA's own forms (`model.cpu_kernels=false`), as when the committed table
was measured; bfloat16 operands take qat_jax/kernels.py's either way.

A rerun skips the runs already in the JSON (and `qat-jax train` resumes an unfinished one).
The wall times are those of whatever shared the machine; only the losses are the evidence.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "precision_seeds.json"
SEEDS = (0, 1, 2, 3, 4)
PRECISIONS = ("float32", "bfloat16")
MAX_DIFF = 0.01  # nats: the most a default may move the mean validation loss (issue 32)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def train(workdir: Path, precision: str, seed: int) -> dict:
    """One `qat-jax train` of the tiny config; its result.json."""
    run_dir = workdir / f"{precision}-seed{seed}"
    cmd = [sys.executable, "-m", "qat_jax", "train", f"--workdir={run_dir}",
           f"--config.seed={seed}", f"--config.model.matmul_precision={precision}",
           "--config.model.cpu_kernels=false"]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    result = json.loads((run_dir / "result.json").read_text())
    return {"precision": precision, "seed": seed, "val_loss": result["val_loss"],
            "wall_s": time.time() - t0}


def verdict(rows: list[dict]) -> dict:
    """Issue 32's rule on the rows (each precision at every seed of SEEDS)."""
    loss = {p: np.array([r["val_loss"] for r in rows if r["precision"] == p]) for p in PRECISIONS}
    f32, bf16 = loss["float32"], loss["bfloat16"]
    diff = float(bf16.mean() - f32.mean())
    in_spread = bool(f32.min() <= bf16.mean() <= f32.max())
    return {"float32_mean": float(f32.mean()), "float32_min": float(f32.min()),
            "float32_max": float(f32.max()), "float32_sd": float(f32.std(ddof=1)),
            "bfloat16_mean": float(bf16.mean()), "bfloat16_sd": float(bf16.std(ddof=1)),
            "mean_diff": diff, "within_spread": in_spread,
            "within_max_diff": abs(diff) <= MAX_DIFF,
            "bfloat16_default": in_spread and abs(diff) <= MAX_DIFF}


def table(rows: list[dict]) -> str:
    by = {(r["precision"], r["seed"]): r for r in rows}
    lines = ["| seed | float32 | bfloat16 operands | difference |", "|---|---|---|---|"]
    for s in SEEDS:
        a, b = by[("float32", s)]["val_loss"], by[("bfloat16", s)]["val_loss"]
        lines.append(f"| {s} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    a = p.parse_args()
    workdir = Path(a.workdir)
    done = json.loads(OUT.read_text()) if OUT.exists() else {"cpu": cpu_name(), "runs": []}
    have = {(r["precision"], r["seed"]) for r in done["runs"]}
    for seed in SEEDS:
        for precision in PRECISIONS:
            if (precision, seed) in have:
                continue
            done["runs"].append(train(workdir, precision, seed))
            OUT.write_text(json.dumps(done, indent=2) + "\n")
    done["verdict"] = verdict(done["runs"])
    OUT.write_text(json.dumps(done, indent=2) + "\n")
    print(table(done["runs"]))
    print(json.dumps(done["verdict"], indent=2))


if __name__ == "__main__":
    main()
