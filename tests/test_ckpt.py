"""Checkpoints and faults: exact resume after SIGKILL, SIGTERM, corrupt checkpoints, and a
checkpoint written on one mesh restored on another."""

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, SMALL_FLAGS, cli_env, overrides_to_flags, run_cli, small_config

from qat_jax import ckpt, resolve, train
from qat_jax.tools import evaluate

# Its module-scoped fixtures are built once: its tests run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("ckpt")

# 120 steps, a checkpoint every 10: slow enough to be killed mid-run.
LONG = {**SMALL_FLAGS, "schedule.total_tokens": 8 * 32 * 120, "checkpoint.every_steps": 10,
        "logging.every_steps": 10, "logging.eval_every_steps": 1000}


def _train_args(workdir, cache_dir, overrides=LONG):
    return ["train", f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
            *overrides_to_flags(overrides)]


def _final_params(workdir: Path, step: int):
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return state["params"]


def _start(workdir, cache_dir):
    return subprocess.Popen([sys.executable, "-m", "qat_jax", *_train_args(workdir, cache_dir)],
                            env=cli_env(1), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, workdir: Path, step: int, timeout=240):
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, cache_dir):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli(_train_args(straight, cache_dir))

    proc = _start(killed, cache_dir)
    _wait_for_checkpoint(proc, killed, 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    steps = ckpt.Checkpoints(killed, 3).steps()
    assert steps and steps[-1] < 120
    out = run_cli(_train_args(killed, cache_dir)).stdout
    assert f"resumed from the checkpoint at step {steps[-1]}" in out

    a, b = _final_params(straight, 120), _final_params(killed, 120)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    ra = json.loads((straight / "result.json").read_text())
    rb = json.loads((killed / "result.json").read_text())
    assert ra["val_loss"] == rb["val_loss"]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    proc = _start(workdir, cache_dir)
    _wait_for_checkpoint(proc, workdir, 10)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    match = [line for line in out.splitlines() if line.startswith("SIGTERM: saved")]
    assert match, out
    step = int(match[0].split("step ")[1].split(";")[0])
    assert 10 <= step < 120 and step in ckpt.Checkpoints(workdir, 3).steps()
    assert not (workdir / "result.json").exists()
    out = run_cli(_train_args(workdir, cache_dir)).stdout
    assert f"resumed from the checkpoint at step {step}" in out
    assert (workdir / "result.json").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("finished")
    result = train.train(resolve.resolve(small_config(cache_dir)), workdir)
    return workdir, result


def _damage(step_dir: Path):
    """Overwrite every data file of a checkpoint's state with garbage."""
    damaged = [p for p in (step_dir / "state").rglob("*") if p.is_file()
               and p.stat().st_size > 0 and p.name != "_CHECKPOINT_METADATA"]
    assert damaged
    for p in damaged:
        p.write_bytes(b"\x00garbage" * 3)


def _copy(workdir, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    return copy


def test_corrupt_checkpoint_falls_back_to_previous(finished, tmp_path, caplog):
    workdir, result = finished
    copy = _copy(workdir, tmp_path)
    assert ckpt.Checkpoints(copy, 3).steps() == [10, 15, 20]
    _damage(copy / "checkpoints" / "20")
    with caplog.at_level(logging.WARNING, logger="qat_jax.ckpt"):
        out = evaluate.evaluate_workdir(str(copy))
    assert out["step"] == 15
    assert any("step 20" in r.message and "unreadable" in r.message and
               "falling back to step 15" in r.message for r in caplog.records)
    assert out["val_loss"] != pytest.approx(result["val_loss"], abs=1e-7)


def test_no_readable_checkpoint_is_an_error(finished, tmp_path):
    copy = _copy(finished[0], tmp_path)
    for step in (10, 15, 20):
        _damage(copy / "checkpoints" / str(step))
    with pytest.raises(ckpt.CheckpointError, match="none of the checkpoints"):
        evaluate.evaluate_workdir(str(copy))


def test_eval_matches_final_validation(finished):
    workdir, result = finished
    out = evaluate.evaluate_workdir(str(workdir))
    assert out["step"] == 20
    assert out["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_checkpoint_from_8_device_mesh_restores_on_1(tmp_path, cache_dir):
    workdir = tmp_path / "mesh8"
    flags = {**SMALL_FLAGS, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    run_cli(_train_args(workdir, cache_dir, flags), n_devices=8)
    result = json.loads((workdir / "result.json").read_text())
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    # This process has one device: the state is restored onto a 1 x 1 x 1 mesh.
    assert jax.device_count() == 1
    out = evaluate.evaluate_workdir(str(workdir))
    assert out["step"] == 20
    assert out["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)


def test_partial_checkpoints_are_skipped(finished, tmp_path, caplog):
    """A save cut short (orbax's temporary directory) is not a checkpoint; a step directory
    with missing files is reported and the previous step is used."""
    copy = _copy(finished[0], tmp_path)
    ckdir = copy / "checkpoints"
    shutil.copytree(ckdir / "20", ckdir / "30.orbax-checkpoint-tmp-1700000000")
    assert ckpt.Checkpoints(copy, 3).steps() == [10, 15, 20]
    shutil.copytree(ckdir / "20", ckdir / "25")
    for p in sorted((ckdir / "25" / "state").rglob("*"), reverse=True):
        if p.is_file() and p.name != "_CHECKPOINT_METADATA":
            p.unlink()
    with caplog.at_level(logging.WARNING, logger="qat_jax.ckpt"):
        out = evaluate.evaluate_workdir(str(copy))
    assert out["step"] == 20
    assert any("step 25" in r.message and "falling back to step 20" in r.message
               for r in caplog.records)
