"""The GPU check (benchmarks/gpu_check.sh runs it): on a machine with an accelerator and JAX,
in at most 8 minutes,

1. the train step of configs/paper.py:86m and :160m in bfloat16 with cuDNN attention, full
   precision and 4-bit QAT, each in its own process: tokens/s, MFU against the chip's bf16
   dense peak (and against a matmul peak measured in the same process), peak device memory,
   and the QAT / FP step-time ratio;
2. a short `qat-jax train` that crosses the FP -> QAT switch, then `qat-jax eval` of it;

and one table of it all, printed and written to OUT/gpu_check.md (and .json).

    bash benchmarks/gpu_check.sh [--out=DIR]   # on the GPU machine
    bash benchmarks/gpu_check.sh --shrink      # anywhere: tiny shapes, xla attention, CPU

--shrink runs the same code on shapes a CPU takes in seconds (the test suite runs it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bf16 dense (no sparsity) peak FLOP/s by the device_kind JAX reports, from the vendors'
# data sheets; a chip not listed is measured against its measured matmul peak only
BF16_PEAK = {"H100 80GB HBM3": 989.4e12, "H100 SXM": 989.4e12, "H100 PCIe": 756.5e12,
             "H100 NVL": 835.5e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12,
             "A10G": 125e12}

SIZES = {"86m": "configs/paper.py:86m", "160m": "configs/paper.py:160m"}
GPU_KEYS = {"model.compute_dtype": "bfloat16", "model.attention": "cudnn",
            "data.source": "bible", "data.batch_size": 32}
SHRUNK = {"tiny-a": ("configs/tiny.py", {"model.d_model": 64, "model.n_layers": 2,
                                         "model.n_heads": 2, "model.n_kv_heads": 2,
                                         "model.d_ff": 176, "model.seq_len": 64}),
          "tiny-b": ("configs/tiny.py", {"model.d_model": 96, "model.n_layers": 2,
                                         "model.n_heads": 2, "model.n_kv_heads": 2,
                                         "model.d_ff": 256, "model.seq_len": 64})}
SHRUNK_KEYS = {"model.attention": "xla", "data.batch_size": 4}


def chip_peak(kind: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in kind), None)


def measure(config_arg: str, keys: dict, bits: float | None, steps: int) -> dict:
    """One (config, bits) step in this process: compile and step seconds, tokens/s, MFU
    against the chip's peak and the measured one, peak device memory."""
    import jax
    import jax.numpy as jnp

    from qat_jax import resolve, runconfig, sharding, sizes, trainstep
    from qat_jax.tools import bench

    config = runconfig.config_with(runconfig.load_config_file(str(ROOT / "qat_jax" / config_arg)),
                                   **keys, **{"quant.bits": bits})
    run = resolve.resolve(config)
    mesh = sharding.make_mesh(resolve.mesh_spec(config))
    setup = trainstep.Setup.create(run, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        tokens = bench._tokens(config, mesh)
        compile_s, step_s, _ = bench._step_time(setup, tokens, steps)
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() or {}
    operands = jnp.bfloat16 if setup.net.cfg.bf16_matmuls or config.model.compute_dtype == \
        "bfloat16" else jnp.float32
    big = (4096, 8192) if dev.platform == "gpu" else (256, 512)
    peak_measured = bench.matmul_flops_per_s(operands, sizes=big)
    tokens_per_s = setup.plan.tokens_per_step / step_s
    model, q = sizes.specs(config)
    flops = tokens_per_s * sizes.flops_per_token(model)
    spec = chip_peak(dev.device_kind) if dev.platform == "gpu" else None
    return {"config": config_arg, "bits": bits, "device": dev.device_kind,
            "params": sizes.param_count(model, q)["total"],
            "tokens_per_step": setup.plan.tokens_per_step, "compile_s": compile_s,
            "step_s": step_s, "tokens_per_s": tokens_per_s, "flops_per_s": flops,
            "mfu_chip": flops / spec if spec else None,
            "mfu_measured": flops / peak_measured, "matmul_peak": peak_measured,
            "peak_memory_bytes": stats.get("peak_bytes_in_use")}


def _child(args) -> dict:
    """`measure` in a child process (each its own device memory peak)."""
    cmd = [sys.executable, __file__, "--measure", args[0], "--keys", json.dumps(args[1]),
           "--bits", str(args[2] or 0), "--steps", str(args[3])]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"gpu_check: {args[0]} bits={args[2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_and_eval(workdir: Path, shrink: bool) -> dict:
    """A short 4-bit run that crosses the switch at half its steps, and `qat-jax eval` of
    its last checkpoint: the validation losses of both."""
    keys = ({"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2,
             "model.n_kv_heads": 2, "model.d_ff": 176, "model.seq_len": 64,
             "data.batch_size": 4, "schedule.total_tokens": 64 * 4 * 40}
            if shrink else {"schedule.total_tokens": 128 * 32 * 300, "data.batch_size": 32,
                            "model.seq_len": 128})
    flags = [f"--config.{k}={v}" for k, v in {**keys, "quant.bits": 4,
                                              "qat.fraction_policy": "fixed",
                                              "qat.fraction": 0.5,
                                              "logging.tensorboard": False}.items()]
    t = time.time()
    run = subprocess.run([sys.executable, "-m", "qat_jax", "train", f"--workdir={workdir}",
                          "--config=configs/tiny.py", *flags], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"gpu_check: the train run failed:\n{run.stderr[-3000:]}")
    train_s = time.time() - t
    ev = subprocess.run([sys.executable, "-m", "qat_jax", "eval", f"--workdir={workdir}"],
                        cwd=ROOT, capture_output=True, text=True, check=False)
    if ev.returncode != 0:
        raise SystemExit(f"gpu_check: eval failed:\n{ev.stderr[-3000:]}")
    result = json.loads((workdir / "result.json").read_text())
    evaluated = json.loads(ev.stdout[ev.stdout.index("{"):])  # eval prints one JSON object
    return {"train_s": train_s, "switched": "FP -> QAT" in run.stdout + run.stderr,
            "qat_start_step": result.get("qat_start_step"), "steps": result.get("steps"),
            "val_loss": result.get("val_loss"), "eval_val_loss": evaluated["val_loss"],
            "eval_phase": evaluated["phase"], "eval_step": evaluated["step"]}


def table(rows: list[dict], run: dict, when: str) -> str:
    kind = rows[0]["device"] if rows else "?"
    lines = [f"GPU check, {when}, on {kind}", "",
             "| model | config | mode | params | tokens/step | step ms | tokens/s "
             "| MFU (chip bf16 peak) | MFU (measured matmul peak) | peak memory | QAT / FP |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fp = {r["name"]: r for r in rows if not r["bits"]}
    for r in rows:
        ratio = "" if not r["bits"] else f"{r['step_s'] / fp[r['name']]['step_s']:.3f}"
        mem = r["peak_memory_bytes"]
        mode = f"QAT {r['bits']:g}-bit" if r["bits"] else "FP"
        chip = "-" if r["mfu_chip"] is None else f"{100 * r['mfu_chip']:.1f}%"
        memory = "-" if mem is None else f"{mem / 2**30:.2f} GiB"
        lines.append(
            f"| {r['name']} | {r['config']} | {mode} | {r['params'] / 1e6:.1f}M | "
            f"{r['tokens_per_step']:,} | "
            f"{1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {chip} | "
            f"{100 * r['mfu_measured']:.1f}% | {memory} | {ratio} |")
    lines += ["", f"`qat-jax train`, {run['steps']} steps with 4-bit QAT from step "
              f"{run['qat_start_step']}: {run['train_s']:.0f} s, crossed the switch: "
              f"{'yes' if run['switched'] else 'NO'}, validation loss {run['val_loss']:.4f}; "
              f"`qat-jax eval` of its last checkpoint (step {run['eval_step']}, phase "
              f"{run['eval_phase']}): {run['eval_val_loss']:.4f}"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shrink", action="store_true", help="tiny shapes (CPU, the tests)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 20; 3 shrunk)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--keys", help=argparse.SUPPRESS)
    ap.add_argument("--bits", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:  # the child of `_child`
        print(json.dumps(measure(a.measure, json.loads(a.keys), a.bits or None, a.steps)))
        return
    steps = a.steps or (3 if a.shrink else 20)
    sizes = (SHRUNK if a.shrink
             else {k: (v, GPU_KEYS) for k, v in SIZES.items()})
    rows = []
    for name, (config_arg, keys) in sizes.items():
        keys = {**SHRUNK_KEYS, **keys} if a.shrink else keys
        for bits in (None, 4.0):
            rows.append({"name": name, **_child((config_arg, keys, bits, steps))})
    a.out.mkdir(parents=True, exist_ok=True)
    run = train_and_eval(a.out / f"train-{time.strftime('%Y%m%d-%H%M%S')}", a.shrink)
    when = datetime.date.today().isoformat()
    text = table(rows, run, when)
    (a.out / "gpu_check.md").write_text(text)
    (a.out / "gpu_check.json").write_text(json.dumps({"date": when, "steps": rows,
                                                      "train": run}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
