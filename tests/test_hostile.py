"""The process against a hostile environment: Ctrl-C at any moment, a platform or a cluster
that is not there, a full disk under every writer. Each ends in one clear line (or exit 130),
never a traceback or a crash, and leaves nothing half-written."""

import json
import signal
import subprocess
import sys
import time
from pydoc_data import topics

import pytest
from conftest import ROOT, SMALL_FLAGS, cli_env, overrides_to_flags, run_cli, small_config, tmpfs

from qat_jax import resolve, train

RUNS = ROOT / "docs" / "repro" / "runs.jsonl"


def _start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "qat_jax", *args], env=env or cli_env(1),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc, marker: str, timeout=120) -> str:
    """stdout up to and including the first line holding `marker`."""
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"ended before {marker!r}:\n{''.join(seen)}"
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} in {timeout} s:\n{''.join(seen)}")


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_fit_ends_it_at_once_and_writes_nothing(tmp_path, presses):
    """jax's runtime callbacks can swallow a KeyboardInterrupt, and the interpreter's teardown
    under the runtime's threads could crash: either way Ctrl-C must end the fit with 130."""
    out = tmp_path / "law.json"
    proc = _start(["fit", f"--runs={RUNS}", "--law=qat_wsd", f"--out={out}"])
    _read_until(proc, "fitting the qat_wsd law to")
    time.sleep(2)  # into the fit's compiled steps
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest  # not -11 (a segfault), not 0 (the signal lost)
    assert "interrupted" in rest and "Traceback" not in rest, rest
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_two_ctrl_c_in_the_first_compile_stop_at_once_and_the_rerun_starts(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    args = ["train", f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
            *overrides_to_flags(SMALL_FLAGS)]
    proc = _start(args)
    _read_until(proc, "plan:")  # printed just before the first compile
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in rest, rest
    # Whatever the second press left, the same command (or another config) starts cleanly.
    changed = {**SMALL_FLAGS, "model.d_model": 32, "model.d_ff": 64}
    done = run_cli(["train", f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
                    *overrides_to_flags(changed)])
    assert "done in" in done.stdout
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 32


def test_the_second_ctrl_c_in_a_loop_takes_the_process_stop_that_no_callback_swallows():
    """The race the test above can lose: the second press lands inside a runtime callback,
    which swallows a KeyboardInterrupt. The loop's handler then calls the CLI's own stop."""
    from qat_jax import preemption

    stops = []

    def process_handler(signum, frame):
        raise AssertionError("the loop's handler owns SIGINT while the loop runs")

    process_handler.stop_now = lambda: stops.append("now")
    previous = signal.signal(signal.SIGINT, process_handler)
    try:
        with preemption.Preemption() as signals:
            signals._handle(signal.SIGINT, None)
            assert signals.signal == "SIGINT" and stops == [] and signals.reached(0)
            with pytest.raises(KeyboardInterrupt):  # stop_now returned: still an interrupt
                signals._handle(signal.SIGINT, None)
        assert stops == ["now"] and signal.getsignal(signal.SIGINT) is process_handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with preemption.Preemption() as signals:  # a library caller's: Python's own interrupt
            signals._handle(signal.SIGINT, None)
            with pytest.raises(KeyboardInterrupt):
                signals._handle(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("platforms", ["gpu", "cuda"])
def test_a_platform_jax_cannot_start_is_named(tmp_path, platforms):
    env = {**cli_env(1), "JAX_PLATFORMS": platforms}
    proc = subprocess.run([sys.executable, "-m", "qat_jax", "train",
                           f"--workdir={tmp_path / 'run'}"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"JAX_PLATFORMS='{platforms}' asks for a platform that jax cannot start" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,match", [
    # (no cluster here; in a process whose jax has started, jax says that instead)
    (["--distributed"], "jax.distributed.initialize() failed ("),
    (["--coordinator_address=localhost:notaport"], "expected host:port with a port in 1..65535"),
    (["--coordinator_address=localhost:0"], "expected host:port"),
    (["--coordinator_address=:1234"], "expected host:port"),
    (["--coordinator_address=nonexistent.invalid:1234", "--num_processes=2", "--process_id=0"],
     "the host 'nonexistent.invalid' does not resolve"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=5"],
     "--process_id=5: must be in 0..1 (--num_processes=2)"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=-1"],
     "--process_id=-1: must be in 0..1"),
    (["--coordinator_address=localhost:1234", "--num_processes=0"],
     "--num_processes=0: must be at least 1"),
    (["--num_processes=2"], "read only with --distributed or --coordinator_address"),
])
def test_bad_cluster_flags_are_usage_errors(tmp_path, capsys, flags, match):
    """In this process: each is refused before jax.distributed starts anything."""
    for command in (["train"], ["sweep", "--fractions=0,0.5", "--bits=4"]):
        code, err = _cli([*command, f"--workdir={tmp_path / 'w'}", *flags], capsys)
        assert code == 2 and match in err, err
        assert not (tmp_path / "w").exists()


@pytest.fixture
def full_disk(tmp_path):
    """A 400 KiB tmpfs: room for a tokenizer, not for a corpus's shards or a model's weights."""
    with tmpfs(tmp_path / "disk", "400k") as disk:
        yield disk


def _cli(args, capsys):
    from qat_jax import cli

    code = cli.main(args)
    return code, capsys.readouterr().err


def test_a_full_disk_under_each_writer_is_named_and_leaves_nothing(full_disk, tmp_path, capsys,
                                                                   cache_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in topics.topics.values()))
    # prepare: the shards do not fit (the flag and the file named, no temporary left)
    code, err = _cli(["prepare", f"--input={corpus}", f"--out={full_disk / 'prep'}",
                      "--vocab_size=1000"], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert f"--out={full_disk / 'prep'}: writing train-00000.array_record failed (No space " \
           f"left on device); free space on that device" in err
    assert list(full_disk.iterdir()) == []
    # export --format=hf: the weights do not fit
    workdir = tmp_path / "run"
    config = small_config(cache_dir)
    train.train(resolve.resolve(config), workdir)
    code, err = _cli(["export", f"--workdir={workdir}", f"--out={full_disk / 'hf'}",
                      "--format=hf"], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert f"No space left on device: {full_disk / 'hf' / 'model.safetensors'}" in err
    assert list(full_disk.iterdir()) == []
    # the corpus cache: named with its config key
    code, err = _cli(["train", f"--workdir={tmp_path / 'run2'}",
                      f"--config.data.cache_dir={full_disk / 'cache'}",
                      "--config.data.source=files", f"--config.data.path={corpus}",
                      *overrides_to_flags(SMALL_FLAGS)], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert f"data.cache_dir='{full_disk / 'cache'}': cannot write" in err
    assert "No space left on device" in err and "set --config.data.cache_dir" in err
    assert not (tmp_path / "run2").exists()


def test_a_failed_write_names_its_file(tmp_path, monkeypatch):
    """A full disk's failed write() names no file; every writer of ours says which."""
    from pathlib import Path

    from qat_jax import files, metrics

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as e:
        files.atomic_write(tmp_path / "result.json", "{}")
    assert e.value.filename == str(tmp_path / "result.json")
    monkeypatch.undo()
    writer = metrics.MetricsWriter(tmp_path, tensorboard=False)
    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError) as e:
        writer.write(1, loss=1.0)
    assert e.value.filename == str(tmp_path / "metrics.jsonl")
