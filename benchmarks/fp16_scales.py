"""What training on fp16 scales (quant.scale_dtype=float16, the grid llama.cpp serves) costs:
the same 4-bit QAT run of configs/tiny.py with float32 and with float16 scales, at each seed
given, each trained in its own process; and, on each float32 run's own weights, the loss with
its scales rounded to fp16 afterwards (what the export does without the setting: the rounding
alone, no second trajectory). The validation losses go to benchmarks/fp16_scales.json.

    python benchmarks/fp16_scales.py --workdir=/tmp/fp16_scales --seeds=0,1
    # two runs at a time, about 12 minutes a seed on 2 cores

A rerun reads the runs already finished in --workdir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "fp16_scales.json"
DTYPES = ("float32", "float16")


def _train(workdir: Path, seed: int):
    procs = []
    for dtype in DTYPES:
        run = workdir / f"{dtype}-s{seed}"
        if not (run / "result.json").exists():
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "qat_jax", "train", f"--workdir={run}",
                 "--config=configs/tiny.py", "--config.quant.bits=4", f"--config.seed={seed}",
                 f"--config.quant.scale_dtype={dtype}"], cwd=ROOT))
    for proc in procs:
        if proc.wait() != 0:
            sys.exit(f"a run of seed {seed} failed")


def _loss_with_fp16_scales(run: Path) -> tuple[float, float]:
    """(validation loss as trained, with the scales rounded to fp16) of a float32 run."""
    import numpy as np

    from qat_jax import data, model, resolve, runconfig, trainstep
    from qat_jax.tools import restore

    run_, _, _, params = restore.restore(str(run))
    config = run_.config  # the saved config, its scale dtype varied below
    losses = []
    for dtype in DTYPES:
        c = runconfig.config_with(config, **{"quant.scale_dtype": dtype})
        net = model.Decoder(model.ModelConfig.from_config(c))
        spec = resolve.data_spec(c)
        batches = data.validation_batches(data.load_corpus(spec), spec)
        losses.append(float(np.mean([trainstep.loss_fn(params, b, net=net) for b in batches])))
    return losses[0], losses[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        _train(workdir, seed)
    table = {"config": "configs/tiny.py --config.quant.bits=4 --config.seed=S "
                       "--config.quant.scale_dtype=D", "seeds": {}}
    for seed in seeds:
        row = {}
        for dtype in DTYPES:
            r = json.loads((workdir / f"{dtype}-s{seed}" / "result.json").read_text())
            row[f"val_loss_{dtype}"] = r["val_loss"]
            row["qat_fraction"] = r["qat_fraction"]
        row["trained_float16_minus_float32"] = row["val_loss_float16"] - row["val_loss_float32"]
        as_trained, rounded = _loss_with_fp16_scales(workdir / f"float32-s{seed}")
        row["float32_run_evaluated"] = as_trained
        row["float32_run_scales_rounded_to_fp16"] = rounded
        row["rounding_alone"] = rounded - as_trained
        table["seeds"][str(seed)] = row
    rows = list(table["seeds"].values())
    table["mean_trained_float16_minus_float32"] = statistics.mean(
        r["trained_float16_minus_float32"] for r in rows)
    if len(rows) > 1:
        table["float32_seed_spread"] = (max(r["val_loss_float32"] for r in rows)
                                        - min(r["val_loss_float32"] for r in rows))
    table["max_rounding_alone"] = max(abs(r["rounding_alone"]) for r in rows)
    OUT.write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
