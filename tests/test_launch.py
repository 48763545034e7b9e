"""The launchers build the right command lines (they run no training themselves)."""

import importlib.util
import json
import shlex
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, SMALL_FLAGS, overrides_to_flags, run_cli


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tpu_pod_command(capsys):
    tpu = _load("tpu_pod")
    tpu.main(["--tpu=pod", "--zone=us-east5-a", "--project=p", "--workdir=gs://b/r",
              "--config=configs/paper.py:759m", "--", "--config.data.path=/d"])
    argv = shlex.split(capsys.readouterr().out)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--worker=all" in argv and "--zone=us-east5-a" in argv and "--project=p" in argv
    remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    cd, _, train = remote.partition(" && ")
    assert cd == "cd ~/qat_jax"
    assert shlex.split(train) == ["python3", "-m", "qat_jax", "train",
                                  "--config=configs/paper.py:759m", "--workdir=gs://b/r",
                                  "--distributed", "--config.data.path=/d"]


def test_gpu_multinode_commands(capsys):
    gpu = _load("gpu_multinode")
    gpu.main(["--hosts=n0,n1,n2", "--port=999", "--workdir=/shared/r", "--",
              "--config.mesh.fsdp=8"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        ssh, host, remote = shlex.split(line)
        assert (ssh, host) == ("ssh", f"n{i}")
        args = shlex.split(remote.partition(" && ")[2])
        assert "--coordinator_address=n0:999" in args
        assert "--num_processes=3" in args and f"--process_id={i}" in args
        assert args[-1] == "--config.mesh.fsdp=8"


def test_local_dry_run(capsys):
    local = _load("local")
    assert local.main(["--processes=2", "--devices_per_process=4", "--workdir=/tmp/x",
                       "--dry_run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert all("XLA_FLAGS=--xla_force_host_platform_device_count=4" in line for line in lines)
    assert "--process_id=1" in lines[1] and "--coordinator_address=localhost:" in lines[1]


def test_override_must_be_a_config_key():
    common = _load("common")
    with pytest.raises(ValueError, match="--config.group.key=value"):
        common.train_command("c.py", "/w", ["--lr=1"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_equal_one_host(tmp_path, cache_dir):
    """2 processes x 2 CPU devices (jax.distributed, gloo) train exactly what 1 process with 4
    devices trains: each host reads its own, complete part of every global batch."""
    flags = [f"--config.data.cache_dir={cache_dir}", "--config.mesh.fsdp=2",
             *overrides_to_flags(SMALL_FLAGS)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "local.py"), "--processes=2",
         "--devices_per_process=2", f"--port={_free_port()}", f"--workdir={tmp_path / 'two'}",
         "--", *flags], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("done in") == 1  # only process 0 prints the summary
    run_cli(["train", f"--workdir={tmp_path / 'one'}", *flags], n_devices=4)
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-5)
