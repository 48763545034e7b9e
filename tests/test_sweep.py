import json

import jax
import numpy as np
import pytest
from conftest import SMALL_FLAGS, final_params, overrides_to_flags, run_cli, small_config

from qat_jax import ckpt, kernels, optim, resolve, runconfig, train
from qat_jax.tools import sweep


def _config(cache_dir):
    # 20 steps, warmup 1, checkpoints every 5, only the newest kept (but the trunk's branch points)
    return small_config(cache_dir, **{"checkpoint.max_to_keep": 1})


def test_grid_names_and_branch_points(cache_dir):
    runs = sweep.grid(_config(cache_dir), [0, 0.25, 1], [2.0, 4.0], (True, False))
    assert [r.name for r in runs] == [
        "fp", "b2-f0.25-fused", "b2-f0.25-unfused", "b4-f0.25-fused", "b4-f0.25-unfused",
        "b2-f1-fused", "b4-f1-fused"]  # fraction 1 has no FP phase to unfuse
    ends = {r.name: r.plan.trunk_end for r in runs}
    # fp: its cooldown (last 20% = 4 steps); fused: the QAT start; unfused: its FP cooldown
    # (20% of the 15 FP steps = 3) starts earlier; QAT from scratch: step 0.
    assert ends == {"fp": 16, "b2-f0.25-fused": 15, "b2-f0.25-unfused": 12,
                    "b4-f0.25-fused": 15, "b4-f0.25-unfused": 12, "b2-f1-fused": 0,
                    "b4-f1-fused": 0}
    assert {r.plan.bits for r in runs} == {None, 2.0, 4.0}
    with pytest.raises(resolve.ConfigError, match=r"--fractions: 1.5 is not in \[0, 1\]"):
        sweep.grid(_config(cache_dir), [1.5], [2.0], (True,))
    # Unfused runs at some fractions only (the repro's unfused points).
    some = sweep.grid(_config(cache_dir), [0, 0.25, 0.5], [2.0], (True, False), {0.5})
    assert [r.name for r in some] == ["fp", "b2-f0.25-fused", "b2-f0.5-fused",
                                      "b2-f0.5-unfused"]


def test_controls_have_the_qat_runs_schedules(cache_dir):
    """A fused run's control is full precision with the same LR at every step and the same
    branch point; the fraction whose schedule is the FP-only run's (0.2) gets none: the FP-only
    run is its control. Unfused runs get none."""
    config = _config(cache_dir)
    runs = sweep.grid(config, [0, 0.2, 0.25, 1], [2.0, 4.0], (True, False), controls=True)
    by = {r.name: r for r in runs}
    assert [r.name for r in runs if r.name.startswith("fp")] == ["fp", "fp-c0.25", "fp-c0.95"]
    for f, ctrl in (("0.25", "fp-c0.25"), ("1", "fp-c0.95"), ("0.2", "fp")):
        for b in ("2", "4"):
            q, c = by[f"b{b}-f{f}-fused"], by[ctrl]
            assert c.plan.bits is None and c.config.quant.bits is None
            # QAT from scratch leaves the trunk at step 0, its control at its cooldown
            assert c.plan.trunk_end == (q.plan.trunk_end if f != "1" else 1)
            lr_q = optim.lr_schedule(q.optim, q.plan)
            lr_c = optim.lr_schedule(c.optim, c.plan)
            assert [float(lr_q(t)) for t in range(20)] == [float(lr_c(t)) for t in range(20)]
    # without controls the grid is as before
    assert "fp-c0.25" not in {r.name for r in sweep.grid(config, [0, 0.25], [2.0], (True,))}


@pytest.mark.slow
def test_branch_is_the_straight_run_and_reruns_skip(tmp_path, cache_dir, monkeypatch):
    """A QAT branch off the trunk (interrupted mid-way, then resumed by the sweep) ends
    bit-identical to a straight run of the same config; runs.jsonl holds the fitter's keys;
    a rerun trains nothing; a failed run does not stop the others."""
    config = _config(cache_dir)
    d = tmp_path / "sweep"
    [branch] = sweep.grid(config, [0.5], [2.0], (True,))
    # An interrupted branch: the trunk to step 10, the branch from it to step 15.
    trunk = sweep.trunk_config(config)
    assert train.train(resolve.resolve(trunk), d / "trunk",
                       train.Segment(stop_at=10, keep_steps=(10,))) == {"stopped_at": 10}
    assert train.train(branch, d / "runs" / branch.name, train.Segment(
        branch_from=(d / "trunk", 10), stop_at=15)) == {"stopped_at": 15}
    # A run that will fail: its workdir holds another config.
    bad = d / "runs" / "b4-f0.5-fused"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text(json.dumps({"seed": 123}))

    summary = sweep.run_sweep(config, d, [0, 0.5], [2.0, 4.0], (True,))
    assert summary["finished"] == ["fp", "b2-f0.5-fused"]
    assert list(summary["failed"]) == ["b4-f0.5-fused"]
    assert "another config" in summary["failed"]["b4-f0.5-fused"]

    straight = train.train(resolve.resolve(branch.config), tmp_path / "straight")
    result = json.loads((d / "runs" / branch.name / "result.json").read_text())
    assert result["val_loss"] == straight["val_loss"]
    assert result["final_train_loss"] == straight["final_train_loss"]
    (s1, p1), (s2, p2) = final_params(d / "runs" / branch.name, config), final_params(
        tmp_path / "straight", config)
    assert s1 == s2 == 20
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)

    rows = [json.loads(x) for x in (d / "runs.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["fp", "b2-f0.5-fused"]
    fp, qat = rows
    n = result["N"]
    assert {k: fp[k] for k in ("B", "D_fp", "D_qat", "fraction", "S", "fused")} == {
        "B": 16, "D_fp": 5120, "D_qat": 0, "fraction": 0.0, "S": None, "fused": False}
    assert {k: qat[k] for k in ("B", "D_fp", "D_qat", "fraction", "fused", "N")} == {
        "B": 2.0, "D_fp": 2560, "D_qat": 2560, "fraction": 0.5, "fused": True, "N": n}
    served = train.sizes.served_bytes(*train.sizes.specs(config), 2.0)["total"]
    assert qat["S"] == pytest.approx(5120 / served)
    assert qat["loss"] == result["val_loss"]
    assert qat["val_loss_fp"] == result["val_loss_fp"] and fp["val_loss_fp"] is None
    # Compute: trunk to step 16 (the fp run's cooldown), fp 4 steps, each QAT run 10 steps.
    assert summary["branch_points"] == [10, 16]
    assert summary["tokens_trunk"] == 16 * 256
    assert summary["tokens_branches"] == (4 + 10 + 10) * 256
    assert summary["tokens_from_scratch"] == 3 * 20 * 256
    assert summary["saved_frac"] == pytest.approx(1 - 40 / 60)

    # A rerun (the bad run mended) trains only that run; finished ones are untouched.
    (bad / "config.json").unlink()
    before = (d / "runs" / "fp" / "metrics.jsonl").read_text()
    again = sweep.run_sweep(config, d, [0, 0.5], [2.0, 4.0], (True,))
    assert again["finished"] == ["fp", "b2-f0.5-fused", "b4-f0.5-fused"] and not again["failed"]
    assert (d / "runs" / "fp" / "metrics.jsonl").read_text() == before
    assert len((d / "runs.jsonl").read_text().splitlines()) == 3
    # A rerun with another model is refused before anything trains, naming the finished runs
    # and what differs: their results are not this config's.
    other = runconfig.config_with(config, **{"model.d_model": 2 * config.model.d_model})
    with pytest.raises(train.RunError, match=r"trained with another config: trunk \(model"
                                             r"\.d_model: .*finished run fp .*finished run "
                                             r"b2-f0\.5-fused"):
        sweep.run_sweep(other, d, [0, 0.5], [2.0, 4.0], (True,))
    assert len((d / "runs.jsonl").read_text().splitlines()) == 3
    # model.matmul_precision='auto' on a CPU whose own choice is bf16: the sweep takes its
    # trunk's float32, so its finished runs stand and nothing trains again
    monkeypatch.setattr(kernels, "cpu_has_bf16_dot", lambda: True)
    auto = runconfig.config_with(config, **{"model.matmul_precision": "auto"})
    again = sweep.run_sweep(auto, d, [0, 0.5], [2.0, 4.0], (True,))
    assert again["finished"] == ["fp", "b2-f0.5-fused", "b4-f0.5-fused"] and not again["failed"]
    assert (d / "runs" / "fp" / "metrics.jsonl").read_text() == before
    # The trunk kept its branch points beyond checkpoint.max_to_keep (only the newest).
    kept = ckpt.Checkpoints(d / "trunk", 1, read_only=True)
    assert kept.steps() == [10, 16]
    kept.close()


@pytest.mark.slow
def test_sweep_command(tmp_path, cache_dir):
    d = tmp_path / "s"
    flags = [f"--config.data.cache_dir={cache_dir}", *overrides_to_flags(SMALL_FLAGS)]
    proc = run_cli(["sweep", f"--workdir={d}", "--fractions=0,0.25,1", "--bits=2", "--fused=both",
                    *flags])
    names = ["fp", "b2-f0.25-fused", "b2-f0.25-unfused", "b2-f1-fused"]
    for name in names:
        assert name in proc.stdout
    assert "branching saved" in proc.stdout
    assert [json.loads(x)["name"] for x in (d / "runs.jsonl").read_text().splitlines()] == names
    rerun = run_cli(["sweep", f"--workdir={d}", "--fractions=0,0.25,1", "--bits=2",
                     "--fused=both", *flags])
    assert "4 runs (4 already finished)" in rerun.stdout and "branched off" not in rerun.stdout

    bad = run_cli(["sweep", f"--workdir={d}", "--fractions=a,b", *flags], check=False)
    assert bad.returncode == 2 and "--fractions=a,b: not a list of numbers" in bad.stderr
    bad = run_cli(["sweep", f"--workdir={d}", "--fractions=0.5", *flags], check=False)
    assert bad.returncode == 2 and "--bits is required" in bad.stderr
    bad = run_cli(["sweep", f"--workdir={d}", "--fractions=0.5", "--bits=7", *flags], check=False)
    assert bad.returncode == 2 and "--bits: quant.bits=7.0 is not supported" in bad.stderr
    bad = run_cli(["sweep", f"--workdir={d}", "--fractions=2", "--bits=2", *flags], check=False)
    assert bad.returncode == 1 and "--fractions: 2 is not in [0, 1]" in bad.stderr
    bad = run_cli(["sweep", f"--workdir={d}", "--fractions=0", "--bits=2",
                   "--fixed_fractions=x", *flags], check=False)
    assert bad.returncode == 2 and "--fixed_fractions=x: not a list of numbers" in bad.stderr
    bad = run_cli(["sweep", f"--workdir={d}", "--fractions=0", "--bits=2",
                   "--fixed_fractions=0.05", "--fixed_cooldown=0.1", *flags], check=False)
    assert bad.returncode == 1 and "a fixed cooldown of 0.1 of the budget needs a QAT " \
        "fraction in [0.1, 1] to hold it (got 0.05)" in bad.stderr
    # --controls on the same sweep: only the controls train, and every fused run names one
    ctrl = run_cli(["sweep", f"--workdir={d}", "--fractions=0,0.25,1", "--bits=2",
                    "--fused=both", "--controls", *flags])
    assert "4 already finished" in ctrl.stdout
    rows = {r["name"]: r for r in map(json.loads, (d / "runs.jsonl").read_text().splitlines())}
    for r in rows.values():
        if r["fused"]:
            assert rows[r["control"]]["B"] == 16 and rows[r["control"]]["D_cool"] == r["D_cool"]
    assert len(rows) == 6


@pytest.mark.slow
def test_a_diverged_branch_is_one_line_and_its_fix_reruns_it(tmp_path, cache_dir):
    """A branch that diverges is reported in one line naming the QAT keys to lower (no
    traceback); the rerun with that fix reuses the trunk (the QAT keys do nothing in it), keeps
    the failed attempt in failed/, and trains the branch again."""
    d = tmp_path / "s"
    args = ["sweep", f"--workdir={d}", "--fractions=0.5", "--bits=2",
            f"--config.data.cache_dir={cache_dir}", *overrides_to_flags(SMALL_FLAGS),
            "--config.qat.fused_cooldown=False"]
    first = run_cli([*args, "--config.qat.peak_lr=1e6"], check=False)
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr
    assert "It diverged in the QAT phase at 2 bits: lower optimizer.peak_lr or qat.peak_lr" \
        in first.stderr
    assert list(json.loads((d / "sweep.json").read_text())["failed"]) == ["b2-f0.5-unfused"]
    trunk_steps = ckpt.Checkpoints(d / "trunk", 1, read_only=True).steps()

    fixed = run_cli([*args, "--config.qat.peak_lr=1e-3"])
    assert "run b2-f0.5-unfused failed last time with another config (qat.peak_lr: " \
           "1000000.0 -> 0.001): moved to failed/b2-f0.5-unfused-1" in fixed.stdout
    assert "trunk" not in fixed.stdout.split("===")[0].split("branch points")[1]  # not retrained
    assert ckpt.Checkpoints(d / "trunk", 1, read_only=True).steps() == trunk_steps
    assert json.loads((d / "sweep.json").read_text())["failed"] == {}
    [row] = [json.loads(x) for x in (d / "runs.jsonl").read_text().splitlines()]
    assert row["name"] == "b2-f0.5-unfused" and np.isfinite(row["loss"])
    saved = json.loads((d / "failed" / "b2-f0.5-unfused-1" / "config.json").read_text())
    assert saved["qat"]["peak_lr"] == 1e6
