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

from qat_jax import ckpt, files, metrics, train
from qat_jax.errors import UserError
from qat_jax.study import corpus as repro_corpus
from qat_jax.study import grids, repro
from qat_jax.tools import evaluate

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
    straight = train.train(config, tmp_path / "straight")
    workdir = tmp_path / "run"
    train.train(config, workdir)
    (workdir / "result.json").unlink()  # as if killed in the final evaluation: unfinished
    _damage(workdir / "checkpoints" / "20")
    result = train.train(config, workdir)
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
    from configs import repro as repro_config

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
    train.train(config, tmp_path / "a", train.Segment(stop_at=10))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    os.remove(tmp_path / "b" / files.LOCK_FILE)
    result = train.train(config, tmp_path / "b")
    assert result["steps"] == 20


# ----------------------------------------------------------------------------- bad inputs


def _cli(args, capsys):
    """qat-jax in this process: (exit code, stderr)."""
    from qat_jax import cli

    code = cli.main(args)
    return code, capsys.readouterr().err


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("args,match", [
    (["plan", "--params=1e8", "--tokens=inf", "--bits=4"], "--tokens=inf: total training"),
    (["plan", "--params=1e8", "--tokens=1e10", "--bits=4", "--batch_tokens=0"],
     "--batch_tokens=0 must be positive"),
    (["plan", "--params=1e8", "--tokens=1e10", "--bits=0"], "--bits: quant.bits=0.0 is not"),
    (["plan", "--params=nan", "--tokens=1e10", "--bits=4"], "--params=nan: a finite number"),
    (["plan", "--params=inf", "--tokens=1e10", "--bits=4"], "--params=inf: a finite number"),
    (["plan", "--params=-5", "--tokens=1e10", "--bits=4"], "--params=-5.0: a finite number"),
    (["plan", "--params=1e8", "--tokens=nan", "--bits=4"], "--tokens=nan: total training"),
    (["plan", "--params=1e8", "--tokens=1e10", "--bits=nan"], "--bits: quant.bits=nan is not"),
    (["fit", "--runs=r.csv", "--out=/nonexistent/l.json", "--bootstrap=-3"],
     "--bootstrap=-3: the number of refits"),
    (["fit", "--runs=r.csv", "--out=/nonexistent/l.json", "--huber_delta=nan"],
     "--huber_delta=nan: a finite number > 0"),
    (["plan", "--params=1e8", "--tokens=1e10", "--bits=3.3"], "valid: [1, 1.58, 2, 3, 4"),
    (["train", "--config.data.cache_dir="], "data.cache_dir='' would cache tokenizers and "
     "token files in the current directory"),
    (["bench", "--steps=0"], "--steps=0: the timed steps must be at least 1"),
    (["bench", "--steps=-1"], "--steps=-1"),
    (["train", "configs/paper.py:86m"], "unexpected argument 'configs/paper.py:86m': flags take "
     "the form --name=value (did you mean --config=configs/paper.py:86m?)"),
    (["train", "--config.logging.every_steps=5", "--config.model.n_layer=2"],
     "--config.model.n_layer: model has no key 'n_layer'; did you mean n_layers"),
    (["train", "--config.modl.d_model=8"], "the config has no key 'modl'; did you mean model?"),
    (["train", "--config.quant.bits=-1"], "quant.bits=-1.0 is not supported"),
    (["train", "--config.qat.fraction=auto"], "the policy is its own key: "
     "--config.qat.fraction_policy=auto"),
    (["train", "--config.quant.bits=4", "--config.qat.fraction=0.3"],
     "qat.fraction=0.3 is read only with qat.fraction_policy='fixed' (it is 'auto')"),
    (["prepare", "--input=/nonexistent/*.txt", "--out=/nonexistent/out"],
     "--input='/nonexistent/*.txt' matches no file"),
    (["compile", "--devices=1", "--config=configs/paper.py:99m"],
     "get_config raised ValueError: configs/paper.py:99m: unknown size"),
    (["train", "--config.quant.scale_dtype=bfloat16"],
     "quant.scale_dtype='bfloat16'; valid: ('float32', 'float16')"),
])
def test_bad_flags_are_clear_errors(args, match, capsys):
    code, err = _cli(args, capsys)
    assert code in (1, 2) and match in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("text,match", [
    ("x = 1\n", "the file defines no get_config()"),
    ("def get_config(:\n", "syntax error at line 1"),
    ("def get_config():\n    return undefined_name\n",
     "get_config raised NameError: name 'undefined_name' is not defined"),
    ("import no_such_module_here\n", "importing it raised ModuleNotFoundError"),
    ("from configs import base\ndef get_config():\n    c = base.get_config()\n"
     "    c.model.dmodel = 64\n    return c\n",
     "get_config() adds key model.dmodel, which configs/base.py does not declare; did you "
     "mean d_model?"),
    ("from configs import base\ndef get_config():\n    c = base.get_config()\n"
     "    c.extra = {'x': 1}\n    return c\n", "adds key extra.x"),
    ("def get_config():\n    return {'model': {'d_model': 64}}\n",
     "get_config() returned dict, not an ml_collections.ConfigDict"),
    ("def get_config():\n    pass\n", "get_config() returned NoneType"),
    ("import ml_collections\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
     "    c.model = {'d_model': 64}\n    return c\n", "get_config() lacks"),
    ("import sys\ndef get_config():\n    sys.exit(3)\n", "get_config raised SystemExit: 3"),
])
def test_bad_config_files_are_named(tmp_path, capsys, text, match):
    code, err = _cli(["train", f"--config={_write(tmp_path / 'c.py', text)}",
                      f"--workdir={tmp_path / 'run'}"], capsys)
    assert code == 2 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_plan_refuses_a_law_that_ignores_the_split(tmp_path, capsys):
    from qat_jax import law

    path = tmp_path / "chin.json"
    law.Law(law.chinchilla, {"a": 6.0, "b": 7.0, "e": 0.5, "alpha": 0.34, "beta": 0.28}).save(path)
    code, err = _cli(["plan", "--params=1e8", "--tokens=1e10", "--bits=4", f"--law={path}"],
                     capsys)
    assert code == 2 and "'chinchilla' form predicts the same loss for every QAT split" in err
    code, err = _cli(["plan", "--memory=-8GB", "--tokens=1e10", f"--law={path}"], capsys)
    assert code == 2 and "--memory=-8GB" in err and "Traceback" not in err
    code, err = _cli(["plan", "--memory=8GB", "--tokens=1e10", f"--law={path}"], capsys)
    assert code == 2 and "'chinchilla' form predicts the same loss at every bit width" in err
    assert "fit a QAT law (qat-jax fit --law=qat_wsd or qat-jax fit --law=qat)" in err
    # A QAT form fitted to runs that do not vary the split: refit it; the hint never names
    # the form the law already has.
    flat = {"a": 6.0, "b": 7.0, "e": 0.5, "alpha": 0.34, "beta": 0.28, "log_theta": -3.0,
            "kappa": 0.5, "log_phi": -1e3, "chi": 0.0, "psi": 0.0, "omega": 0.0,
            "log_lambda": -1e3, "mu": 0.0, "nu": 0.0, "xi": 0.0, "rho": 0.0}
    law.Law(law.get_form("qat"), flat).save(tmp_path / "flat.json")
    code, err = _cli(["plan", "--params=1e8", "--tokens=1e10", "--bits=4",
                      f"--law={tmp_path / 'flat.json'}"], capsys)
    assert code == 2 and "'qat' form predicts the same loss for every QAT split" in err, err
    assert "refit it on runs at several QAT fractions (or try qat-jax fit --law=qat_wsd)" in err
    assert "--law=qat)" not in err and "--law=qat " not in err


@pytest.mark.parametrize("case", ["nan_params", "inf_params", "not_an_object", "params_list"])
def test_plan_refuses_a_law_file_that_predicts_nothing(tmp_path, capsys, case):
    """A law.json with a NaN or infinite parameter, or not the shape `fit` writes, is refused
    naming the file, before any plan is printed."""
    from qat_jax import law

    path = tmp_path / "law.json"
    law.Law(law.chinchilla, {"a": 6.0, "b": 7.0, "e": 0.5, "alpha": 0.34, "beta": 0.28}).save(path)
    obj = json.loads(path.read_text())
    if case == "nan_params":
        obj["params"]["alpha"] = float("nan")
    elif case == "inf_params":
        obj["params"]["e"] = float("inf")
    elif case == "not_an_object":
        obj = [1, 2]
    else:
        obj["params"] = [6.0, 7.0]
    path.write_text(json.dumps(obj))
    code, err = _cli(["plan", "--params=1e8", "--tokens=1e10", "--bits=4", f"--law={path}"],
                     capsys)
    out = capsys.readouterr().out
    assert code == 1 and str(path) in err and "Traceback" not in err, err
    assert ("not finite" in err) == case.endswith("_params") and "run it:" not in out


def test_fit_refuses_tables_a_law_cannot_answer(tmp_path, capsys):
    """All-equal losses (R^2 undefined), or a QAT law fitted to FP rows only, are refused and
    write nothing; plots an earlier fit wrote are never overwritten."""
    rows = "N,D_fp,D_qat,B,loss\n" + "".join(
        f"{n},{d},0,16,{3.0 if same else 5.0 - d / 1e7 - n / 1e6}\n"
        for same in (True,) for n in (1e6, 2e6, 4e6) for d in (1e7, 2e7, 4e7))
    equal = _write(tmp_path / "equal.csv", rows)
    code, err = _cli(["fit", f"--runs={equal}", f"--out={tmp_path / 'l.json'}",
                      "--law=chinchilla"], capsys)
    assert code == 1 and "losses are equal" in err and not (tmp_path / "l.json").exists()
    fp = _write(tmp_path / "fp.csv", "N,D_fp,D_qat,B,loss\n" + "".join(
        f"{n},{d},0,16,{1 + 400 / n ** 0.3 + 300 / d ** 0.3:.6f}\n"
        for n in (1e6, 2e6, 4e6, 8e6) for d in (1e7, 2e7, 4e7, 8e7)))
    code, err = _cli(["fit", f"--runs={fp}", f"--out={tmp_path / 'l.json'}", "--law=qat"],
                     capsys)
    assert code == 1 and "no quantized run with QAT tokens" in err and "--law=chinchilla" in err
    assert not (tmp_path / "l.json").exists()
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss_vs_fraction.png").write_bytes(b"an earlier fit's")
    code, err = _cli(["fit", f"--runs={fp}", f"--out={tmp_path / 'l.json'}",
                      "--law=chinchilla", f"--plots={tmp_path / 'plots'}"], capsys)
    assert code == 2 and "loss_vs_fraction.png" in err and "nothing is overwritten" in err
    assert (tmp_path / "plots" / "loss_vs_fraction.png").read_bytes() == b"an earlier fit's"
    # a sweep's directory given for its table: the table named
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "runs.jsonl").write_text("")
    code, err = _cli(["fit", f"--runs={tmp_path / 'sweep'}", f"--out={tmp_path / 'l.json'}"],
                     capsys)
    table = tmp_path / "sweep" / "runs.jsonl"
    assert code == 1 and f"is a directory (its runs.jsonl: --runs={table})" in err, err


def test_plan_names_the_config_of_its_size(capsys):
    """A plan by --params prints the shipped config of that size in its train command, or
    says there is none (the default config would train another model)."""
    from qat_jax import cli

    assert cli.main(["plan", "--params=86e6", "--tokens=1e10", "--bits=4"]) == 0
    out = capsys.readouterr().out
    assert "run it: qat-jax train --config=configs/paper.py:86m " in out
    assert "(262,144 tokens per step)" in out  # the config's batch, not --batch_tokens
    assert cli.main(["plan", "--params=1e8", "--tokens=1e10", "--bits=4"]) == 0
    out = capsys.readouterr().out
    assert "no shipped config has 1e+08 parameters" in out and "--config=YOUR_CONFIG.py" in out


def test_sweep_workdir_that_is_a_file(tmp_path, cache_dir, capsys):
    path = _write(tmp_path / "f", "x")
    code, err = _cli(["sweep", f"--workdir={path}", "--fractions=0,0.5", "--bits=4",
                      *overrides_to_flags({**SMALL_FLAGS, "data.cache_dir": cache_dir})], capsys)
    assert code == 1 and "is a file, not a directory" in err
    code, err = _cli(["prepare", f"--input={path}", f"--out={tmp_path / 'f' / 'out'}"], capsys)
    assert code == 1 and "Not a directory" in err and "Traceback" not in err


def test_fit_with_plots_at_a_file_writes_nothing(tmp_path, capsys):
    runs = _write(tmp_path / "runs.csv", "N,D_fp,D_qat,B,loss\n1e6,1e7,0,16,3.0\n")
    plots = _write(tmp_path / "plots", "a file")
    code, err = _cli(["fit", f"--runs={runs}", f"--out={tmp_path / 'law.json'}",
                      f"--plots={plots}"], capsys)
    assert code == 2 and "--plots=" in err and "is a file" in err
    assert not (tmp_path / "law.json").exists()


def test_non_utf8_runs_table(tmp_path, capsys):
    (tmp_path / "runs.jsonl").write_bytes(b'{"N": 1}\n\xff\xfe\n')
    code, err = _cli(["fit", f"--runs={tmp_path / 'runs.jsonl'}", f"--out={tmp_path / 'l.json'}"],
                     capsys)
    assert code == 1 and "not UTF-8 text" in err and "Traceback" not in err


def test_failed_prepare_leaves_no_output(tmp_path, capsys, cache_dir):
    from qat_jax import data, prepare

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
                        tokenizer=data.load_corpus(small_config(cache_dir)).tokenizer_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_truncated_array_record_shard_is_a_data_error(tmp_path, cache_dir):
    from qat_jax import data, prepare

    tok = data.load_corpus(small_config(cache_dir)).tokenizer_path
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
        data.load_corpus(config)


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
    from configs import repro as repro_config
    from qat_jax import sweep

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
    train.train(config, workdir)
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
            train.train(config, copy)
        err = ""
    assert "Traceback" not in err


def test_damaged_caches_are_named_as_caches(tmp_path, cache_dir):
    """A truncated token cache and a damaged cached tokenizer name the cache file and say to
    delete it (it is rebuilt); neither is blamed on data.tokenizer, which was never set."""
    from qat_jax import data

    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    config = small_config(str(cache))
    data.load_corpus(config)
    [npy, *_] = sorted((cache).rglob("*-train.npy"))
    npy.write_bytes(npy.read_bytes()[:100])
    with pytest.raises(data.DataError, match=r"cached token file .*-train.npy .*damaged .*"
                                             r"delete it"):
        data.load_corpus(config)
    for model in cache.rglob("*.model"):
        model.write_bytes(b"garbage")
    with pytest.raises(data.DataError, match=r"cached tokenizer .*damaged: delete it") as e:
        data.load_corpus(config)
    assert "data.tokenizer" not in str(e.value)
