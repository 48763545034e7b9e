"""The benchmark scripts that ship with the project and must keep running: the GPU check in its
shrunk mode (benchmarks/gpu_check.sh --shrink, the same code as on a GPU, on CPU shapes)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_shrunk(tmp_path):
    """One table: FP and 4-bit QAT rows for each model with tokens/s, MFU against the measured
    matmul peak and the QAT / FP ratio; a train run that crosses the switch, and eval of its
    last checkpoint giving the loss the run reported."""
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--shrink", f"--out={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in out.stdout
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = data["steps"]
    assert [(r["name"], r["bits"]) for r in rows] == [
        ("tiny-a", None), ("tiny-a", 4.0), ("tiny-b", None), ("tiny-b", 4.0)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu_measured"] < 1 and r["mfu_chip"] is None
        assert r["tokens_per_s"] == r["tokens_per_step"] / r["step_s"]
    assert table.count("| QAT 4-bit |") == 2 and table.count("| FP |") == 2
    run = data["train"]
    assert run["switched"] and run["eval_phase"] == "qat"
    assert run["qat_start_step"] == run["steps"] // 2 == run["eval_step"] // 2
    assert abs(run["eval_val_loss"] - run["val_loss"]) < 1e-4


def test_gpu_check_chip_peaks():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    assert gpu_check.chip_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_check.chip_peak("NVIDIA H200") == 989.4e12
    assert gpu_check.chip_peak("NVIDIA H100 PCIe") == 756.5e12
    assert gpu_check.chip_peak("cpu") is None


def _benchmark(name: str):
    """A script of benchmarks/ as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _precision_seeds():
    return _benchmark("precision_seeds")


def test_precision_seeds_verdict_follows_issue_32s_rule():
    """bfloat16 becomes the default only if its mean loss lies in the float32 seeds' range and
    within 0.01 nats of their mean; each condition alone can fail it."""
    ps = _precision_seeds()
    f32 = [4.16, 4.15, 4.17, 4.16, 4.14]  # mean 4.156, range [4.14, 4.17]

    def rows(bf16):
        return ([{"precision": "float32", "seed": s, "val_loss": x} for s, x in enumerate(f32)]
                + [{"precision": "bfloat16", "seed": s, "val_loss": x}
                   for s, x in enumerate(bf16)])

    good = ps.verdict(rows([4.16, 4.15, 4.16, 4.17, 4.15]))  # mean 4.158
    assert good["bfloat16_default"] and abs(good["mean_diff"] - 0.002) < 1e-9
    far = ps.verdict(rows([4.17, 4.17, 4.17, 4.17, 4.17]))  # in range, 0.014 above the mean
    assert far["within_spread"] and not far["within_max_diff"] and not far["bfloat16_default"]
    tight = [4.156] * 5
    out = ps.verdict([{"precision": "float32", "seed": s, "val_loss": x}
                      for s, x in enumerate(tight)]
                     + [{"precision": "bfloat16", "seed": s, "val_loss": 4.16} for s in range(5)])
    assert out["within_max_diff"] and not out["within_spread"] and not out["bfloat16_default"]
    assert "| 2 | 4.1700 | 4.1600 | -0.0100 |" in ps.table(rows([4.16, 4.15, 4.16, 4.17, 4.15]))


def _lr_probe():
    return _benchmark("lr_probe")


def test_lr_probe_summary_matches_controls_by_cooldown():
    """The rise is the longest cooldown's control less the shortest's; each 4-bit run's penalty
    is taken against the FP run with its cooldown (the FP-only run where they coincide)."""
    lp = _lr_probe()
    point = lp.grids.Point("xxs2", 800_000)
    recs = [{"name": "fp", "loss": 4.5, "fraction": 0.0, "D_cool": 200, "B": 16},
            {"name": "fp-c0.05", "loss": 4.4, "fraction": 0.0, "D_cool": 50, "B": 16},
            {"name": "fp-c0.8", "loss": 4.7, "fraction": 0.0, "D_cool": 800, "B": 16},
            {"name": "b4-f0.8-fused", "loss": 4.9, "fraction": 0.8, "D_cool": 800, "B": 4.0},
            {"name": "b4-f0.05-fused", "loss": 4.45, "fraction": 0.05, "D_cool": 50, "B": 4.0}]
    s = lp.summarise(point, recs)
    assert s["fractions"] == [0.05, 0.8] and s["fp"] == 4.5
    assert abs(s["rise"] - 0.3) < 1e-12
    assert abs(s["penalty_short"] - 0.05) < 1e-12 and abs(s["penalty_long"] - 0.2) < 1e-12


def test_lr_probe_table_is_the_one_reproduction_quotes():
    """docs/REPRODUCTION.md quotes `python benchmarks/lr_probe.py --table` as it prints the
    committed benchmarks/lr_probe.json, and the study's own row is the committed table's."""
    lp = _lr_probe()
    results = json.loads(lp.OUT.read_text())
    table = lp.table(results)
    assert table in (ROOT / "docs" / "REPRODUCTION.md").read_text()
    study = results["xxs2-0.8M/lr0.003"]
    point = lp._point("xxs2-0.8M")
    assert study["summary"] == lp.summarise(point, lp.committed(point))
