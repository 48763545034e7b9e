"""Faults and shared state: a damaged newest checkpoint is replaced, not trusted; one process
per workdir; Ctrl-C saves and stops; metrics.jsonl has no repeated steps after a resume;
files are written whole; a failed start does not block the corrected rerun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SMALL_FLAGS, cli_env, overrides_to_flags, run_cli, small_config, tmpfs
from test_bad_inputs import _cli, _write

from qat_jax import ckpt, files, metrics, resolve, train
from qat_jax.errors import UserError
from qat_jax.study import corpus as repro_corpus
from qat_jax.study import grids, repro
from qat_jax.tools import evaluate

# Its module-scoped fixtures are built once: its tests run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("faults")

LONG = {**SMALL_FLAGS, "schedule.total_tokens": 8 * 32 * 120, "checkpoint.every_steps": 10,
        "logging.every_steps": 10, "logging.eval_every_steps": 1000}


def _args(workdir, cache_dir, overrides=LONG):
    return ["train", f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
            *overrides_to_flags(overrides)]


def _start(workdir, cache_dir):
    return subprocess.Popen([sys.executable, "-m", "qat_jax", *_args(workdir, cache_dir)],
                            env=cli_env(1), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, path: Path, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"no {path} in time"
        time.sleep(0.02)


def _damage(step_dir: Path):
    for p in (step_dir / "state").rglob("*"):
        if p.is_file() and p.stat().st_size > 0 and p.name != "_CHECKPOINT_METADATA":
            p.write_bytes(b"\x00garbage" * 3)


def test_damaged_newest_checkpoint_is_replaced_not_trusted(tmp_path, cache_dir):
    """The run's step-20 checkpoint is damaged before it finished: the rerun resumes from 15,
    trains to 20, saves a new step 20 (the damaged one moved aside), and eval reads the model
    whose loss result.json reports."""
    config = small_config(cache_dir)
    straight = train.train(resolve.resolve(config), tmp_path / "straight")
    workdir = tmp_path / "run"
    train.train(resolve.resolve(config), workdir)
    (workdir / "result.json").unlink()  # as if killed in the final evaluation: unfinished
    _damage(workdir / "checkpoints" / "20")
    result = train.train(resolve.resolve(config), workdir)
    assert result["val_loss"] == straight["val_loss"]  # 15 -> 20 redone exactly
    assert [p.name.split("-")[0] for p in (workdir / "damaged_checkpoints").iterdir()] == ["20"]
    out = evaluate.evaluate_workdir(str(workdir))
    assert out["step"] == 20 and out["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)


def test_second_process_on_a_workdir_is_refused_and_stale_lock_is_taken(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from qat_jax import files\n"
         f"with files.WorkdirLock({str(tmp_path)!r}):\n"
         "    print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        with pytest.raises(UserError, match=rf"in use by another qat-jax \(pid {holder.pid} on"):
            with files.WorkdirLock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock file is still there, naming it; its lock went with it.
    assert f"pid {holder.pid}" in (tmp_path / files.LOCK_FILE).read_text()
    with files.WorkdirLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / files.LOCK_FILE).read_text()


def test_train_refuses_a_locked_workdir_before_work(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    with files.WorkdirLock(workdir):
        proc = run_cli(_args(workdir, cache_dir, SMALL_FLAGS), check=False)
    assert proc.returncode == 1 and "is in use by another qat-jax" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in workdir.iterdir()) == [files.LOCK_FILE]


@pytest.mark.slow
def test_ctrl_c_saves_and_stops_then_resumes(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    proc = _start(workdir, cache_dir)
    _wait_for(proc, workdir / "checkpoints" / "10")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "Ctrl-C: stopping after this step" in out
    line = next(x for x in out.splitlines() if x.startswith("SIGINT: saved the checkpoint"))
    step = int(line.split("step ")[1].split(";")[0])
    assert 10 <= step < 120 and step in ckpt.Checkpoints(workdir, 3, read_only=True).steps()
    out = run_cli(_args(workdir, cache_dir)).stdout
    assert f"resumed from the checkpoint at step {step}" in out
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 120  # no step twice


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, tensorboard=False)
    for step in (10, 20, 30):
        writer.write(step, loss=1.0)
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')  # a kill mid-line
    writer = metrics.MetricsWriter(tmp_path, tensorboard=False)
    writer.drop_after(20)
    writer.write(30, loss=2.0)
    writer.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(10, 1.0), (20, 1.0), (30, 2.0)]


def test_atomic_write_leaves_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = files.atomic_write(tmp_path / "config.json", "old")

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        files.atomic_write(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_damaged_config_json_is_a_clear_error(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"model": {"d_mod')
    proc = run_cli(_args(workdir, cache_dir, SMALL_FLAGS), check=False)
    assert proc.returncode == 1 and "config.json is damaged" in proc.stderr, proc.stderr
    assert "move that file aside" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("make", ["file", "under_file"])
def test_workdir_that_is_or_lies_under_a_file(tmp_path, cache_dir, make):
    (tmp_path / "f").write_text("x")
    workdir = tmp_path / "f" if make == "file" else tmp_path / "f" / "run"
    proc = run_cli(_args(workdir, cache_dir, SMALL_FLAGS), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ("is a file, not a directory" if make == "file" else "Not a directory") in proc.stderr


def test_read_only_workdir_is_a_clear_error(tmp_path, cache_dir):
    """A read-only file system (a tmpfs mounted read-only; root writes through mode bits)."""
    workdir = tmp_path / "ro"
    workdir.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(workdir)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = run_cli(_args(workdir / "run", cache_dir, SMALL_FLAGS), check=False)
    finally:
        subprocess.run(["umount", str(workdir)], check=True)
    assert proc.returncode == 1 and "Read-only file system" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_repro_with_a_failing_corpus_writes_no_repro_json(tmp_path, cache_dir, monkeypatch):
    """A start that fails while building the corpus leaves nothing that makes the corrected
    rerun "another study"."""
    from qat_jax.configs import repro as repro_config

    def broken(*args, **kwargs):
        raise repro.ReproError("the second corpus is unreadable")

    monkeypatch.setattr(repro_corpus, "build_corpus", broken)
    grid = grids.GRIDS["quick"]
    config = repro_config.get_config()
    with pytest.raises(repro.ReproError, match="unreadable"):
        repro.run(config, tmp_path / "study", grid, "pydoc-topics")
    assert not (tmp_path / "study" / "repro.json").exists()
    monkeypatch.undo()
    # and the same workdir with another corpus is not refused as "started otherwise"
    spec = repro._check_start(tmp_path / "study", grid, "none", config)
    assert spec is not None and spec["second_corpus"] == "none"


def test_interrupted_stop_leaves_workdir_resumable(tmp_path, cache_dir):
    """A preempted run's files (config, checkpoints, metrics) are whole; shutil copies them
    (what a user does to move a run) and the copy resumes."""
    config = small_config(cache_dir)
    train.train(resolve.resolve(config), tmp_path / "a", train.Segment(stop_at=10))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    os.remove(tmp_path / "b" / files.LOCK_FILE)
    result = train.train(resolve.resolve(config), tmp_path / "b")
    assert result["steps"] == 20


def test_failed_prepare_leaves_no_output(tmp_path, capsys, cache_dir):
    from qat_jax import data
    from qat_jax.tools import prepare

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"caf\xe9 " * 100)  # Latin-1, not UTF-8
    code, err = _cli(["prepare", f"--input={tmp_path / 'in' / '*'}",
                      f"--out={tmp_path / 'out'}", "--vocab_size=100"], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no out/, no temporary
    assert "--vocab_size" in err or "UTF-8" in err  # prepare's flags, not config keys
    (tmp_path / "in" / "a.txt").write_text("one short document")
    with pytest.raises(UserError, match="leave a split empty"):  # too few documents
        prepare.prepare(str(tmp_path / "in" / "*"), str(tmp_path / "out"),
                        tokenizer=data.load_corpus(resolve.data_spec(small_config(cache_dir))).tokenizer_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_truncated_array_record_shard_is_a_data_error(tmp_path, cache_dir):
    from qat_jax import data
    from qat_jax.tools import prepare

    tok = data.load_corpus(resolve.data_spec(small_config(cache_dir))).tokenizer_path
    (tmp_path / "in").mkdir()
    import pydoc_data.topics

    with open(tmp_path / "in" / "d.jsonl", "w") as f:
        for text in list(pydoc_data.topics.topics.values())[:120]:
            f.write(json.dumps({"text": text}) + "\n")
    meta = prepare.prepare(str(tmp_path / "in" / "*"), str(tmp_path / "out"), tokenizer=tok,
                           val_every_nth_doc=10, record_tokens=1000, shard_records=4)
    shard = tmp_path / "out" / meta["splits"]["train"]["shards"][-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    config = small_config(cache_dir, **{"data.source": "array_record",
                                        "data.path": str(tmp_path / "out")})
    with pytest.raises(data.DataError, match="write it again with `qat-jax prepare`"):
        data.load_corpus(resolve.data_spec(config))


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (room for two checkpoints of the small model)."""
    with tmpfs(tmp_path / "disk", "3m") as disk:
        yield disk


@pytest.mark.slow
def test_full_disk_is_one_clear_message_and_keeps_the_last_checkpoint(small_disk, tmp_path,
                                                                       cache_dir):
    workdir = small_disk / "run"
    proc = run_cli(_args(workdir, cache_dir, {**SMALL_FLAGS, "checkpoint.every_steps": 5}),
                   check=False)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and "no space left on the device" in err, err
    kept = ckpt.Checkpoints(workdir, 3, read_only=True).steps()
    assert kept and f"The last good checkpoint is step {kept[-1]}" in err
    assert not list((workdir / "checkpoints").glob("*tmp*"))  # the partial save's space freed
    # Moved to a larger disk, the run resumes from that checkpoint and finishes.
    shutil.copytree(workdir, tmp_path / "moved")
    out = run_cli(_args(tmp_path / "moved", cache_dir,
                        {**SMALL_FLAGS, "checkpoint.every_steps": 5})).stdout
    assert f"resumed from the checkpoint at step {kept[-1]}" in out
    assert (tmp_path / "moved" / "result.json").exists()


def test_sweep_and_repro_refuse_a_workdir_in_use(tmp_path, cache_dir):
    """The lock is per open file: even this process's second sweep or repro is refused."""
    from qat_jax.configs import repro as repro_config
    from qat_jax.tools import sweep

    with files.WorkdirLock(tmp_path / "s"):
        with pytest.raises(UserError, match="is in use by another qat-jax"):
            sweep.run_sweep(small_config(cache_dir, **{"quant.bits": 4.0}), tmp_path / "s",
                            [0.0, 0.5], [4.0], (True,))
    with files.WorkdirLock(tmp_path / "r"):
        with pytest.raises(UserError, match="is in use by another qat-jax"):
            repro.run(repro_config.get_config(), tmp_path / "r", grids.GRIDS["quick"], "none")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [files.LOCK_FILE]


def test_attention_the_platform_cannot_run_is_a_clear_error(tmp_path, capsys):
    """Decided when the model is built for its platform, still before anything compiles."""
    code, err = _cli(["train", "--config.model.attention=cudnn", f"--workdir={tmp_path / 'r'}",
                      *overrides_to_flags({**SMALL_FLAGS, "data.cache_dir": str(tmp_path)})],
                     capsys)
    assert code == 1 and "model.attention='cudnn' needs an NVIDIA GPU" in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("saved") / "run"
    config = small_config(cache_dir)
    train.train(resolve.resolve(config), workdir)
    return config, workdir


@pytest.mark.parametrize("case", ["config_truncated", "config_a_list", "runs_not_objects",
                                  "export_not_safetensors", "metrics_not_utf8"])
def test_every_saved_file_goes_through_a_checked_reader(small_run, tmp_path, capsys, case):
    """A saved file that is truncated, of the wrong type or not UTF-8 is one clear error
    naming the file and what to do, never a traceback (files.read_json / read_jsonl)."""
    config, workdir = small_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    if case.startswith("config"):
        text = (copy / "config.json").read_text()
        (copy / "config.json").write_text(text[: len(text) // 2] if case == "config_truncated"
                                          else "[1, 2]")
        code, err = _cli(["eval", f"--workdir={copy}"], capsys)
        assert code == 1 and "config.json" in err and "restore it" in err, err
    elif case == "runs_not_objects":
        runs = _write(tmp_path / "runs.jsonl", '{"N": 1}\n5\nnull\n')
        code, err = _cli(["fit", f"--runs={runs}", f"--out={tmp_path / 'law.json'}"], capsys)
        assert code == 1 and "line 2: '5' is not a JSON object" in err, err
    elif case == "export_not_safetensors":
        fake = _write(tmp_path / "model.safetensors", "not a model")
        code, err = _cli(["generate", f"--export={fake}", "--prompt=In"], capsys)
        assert code == 1 and "is not a readable safetensors export" in err, err
    else:
        (copy / "result.json").unlink()  # unfinished: a rerun resumes and reads the metrics
        (copy / "metrics.jsonl").write_bytes(b'{"step": 5}\n\xff\xfe\n')
        with pytest.raises(files.SavedFileError, match=r"metrics.jsonl is not UTF-8 text .*"
                                                       r"move it aside"):
            train.train(resolve.resolve(config), copy)
        err = ""
    assert "Traceback" not in err


def test_damaged_caches_are_named_as_caches(tmp_path, cache_dir):
    """A truncated token cache and a damaged cached tokenizer name the cache file and say to
    delete it (it is rebuilt); neither is blamed on data.tokenizer, which was never set."""
    from qat_jax import data

    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    config = small_config(str(cache))
    # The session cache holds other tests' corpora too: damage the file this config reads.
    npy = Path(data.load_corpus(resolve.data_spec(config)).train.filename)
    assert npy.is_relative_to(cache) and npy.name.endswith("-train.npy"), npy
    npy.write_bytes(npy.read_bytes()[:100])
    with pytest.raises(data.DataError, match=r"cached token file .*-train.npy .*damaged .*"
                                             r"delete it"):
        data.load_corpus(resolve.data_spec(config))
    for model in cache.rglob("*.model"):
        model.write_bytes(b"garbage")
    with pytest.raises(data.DataError, match=r"cached tokenizer .*damaged: delete it") as e:
        data.load_corpus(resolve.data_spec(config))
    assert "data.tokenizer" not in str(e.value)
