"""What training on fp16 scales (quant.scale_dtype=float16, the grid llama.cpp serves) costs:
the same 4-bit QAT run of configs/tiny.py with float32 and with float16 scales, each trained in
its own process, their validation losses written to benchmarks/fp16_scales.json.

    python benchmarks/fp16_scales.py --workdir=/tmp/fp16_scales   # about 12 minutes on 2 cores

A rerun resumes (or reads) the two runs in --workdir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "fp16_scales.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    runs = {}
    procs = {}
    for dtype in ("float32", "float16"):
        workdir = Path(args.workdir) / dtype
        if not (workdir / "result.json").exists():
            procs[dtype] = subprocess.Popen(
                [sys.executable, "-m", "qat_jax", "train", f"--workdir={workdir}",
                 "--config=configs/tiny.py", "--config.quant.bits=4",
                 f"--config.quant.scale_dtype={dtype}"], cwd=ROOT)
        runs[dtype] = workdir
    for dtype, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"the {dtype} run failed")
    table = {}
    for dtype, workdir in runs.items():
        r = json.loads((workdir / "result.json").read_text())
        table[dtype] = {"val_loss": r["val_loss"], "qat_fraction": r["qat_fraction"],
                        "steps": r["steps"]}
    table["float16_minus_float32_nats"] = (table["float16"]["val_loss"]
                                           - table["float32"]["val_loss"])
    table["config"] = "configs/tiny.py --config.quant.bits=4 (quant.scale_dtype as keyed)"
    OUT.write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
