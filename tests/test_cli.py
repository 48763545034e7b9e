"""End-to-end tests of the `qat-jax` command (run as `python -m qat_jax` in a subprocess)."""

import json
import pydoc_data.topics
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_FLAGS, overrides_to_flags, run_cli

from qat_jax import data, kernels, model, resolve, runconfig, trainstep
from qat_jax.tools import packed

# Its module-scoped fixtures are built once: its tests run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("cli")


def test_help_lists_commands():
    out = run_cli(["--help"]).stdout
    for command in ("train", "eval", "prepare", "bench"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M)
    train_help = run_cli(["train", "--help"]).stdout
    assert "--config" in train_help and "--workdir" in train_help and "distributed" in train_help


def test_console_script_installed():
    beside = Path(sys.executable).parent / "qat-jax"  # the venv's scripts, on PATH or not
    exe = str(beside) if beside.exists() else shutil.which("qat-jax")
    if exe is None:
        pytest.skip("qat-jax is not on PATH (package not installed with pip)")
    import subprocess

    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: qat-jax COMMAND" in out


@pytest.mark.parametrize("args,code,message", [
    (["frobnicate"], 2, "unknown command 'frobnicate'"),
    (["train", "--config.model.n_layer=3"], 2,
     "--config.model.n_layer: model has no key 'n_layer'; did you mean n_layers"),
    (["train", "--config.model.n_layers=abc"], 2, "--config.model.n_layers=abc"),
    (["train", "--config=nope.py"], 2,
     "--config=nope.py: no such file (shipped configs: ['base.py', 'paper.py', 'repro.py', "
         "'tiny.py'])"),
    (["train", "--config=paper.py:3b"], 2, "unknown size; valid: ['86m'"),
    (["train", "--config.model.d_model=250"], 1,
     "model.d_model=250 is not divisible by model.n_heads=4"),
    (["train", "--config.data.source=files", "--config.data.path=/nonexistent/*.txt"], 1,
     "data.path='/nonexistent/*.txt' matches no file"),
    (["train", "--config.mesh.tensor=2"], 1, "does not divide the 1 devices"),
    (["eval"], 2, "--workdir is required"),
    (["eval", "--workdir=/nonexistent"], 1, "not a qat-jax run directory"),
    (["prepare", "--input=/nonexistent/*"], 2, "--input and --out are required"),
    (["repro"], 2, "--workdir is required"),
    (["repro", "--workdir=/nonexistent/w", "--grid=huge"], 2,
     "--grid='huge': give one grid, one of ['full', 'quick', 'tuned']"),
    (["repro", "--workdir=/nonexistent/w", "--quick", "--grid=tuned"], 2,
     "--grid='tuned' with --quick: give one grid"),
    (["repro", "--workdir=/nonexistent/w", "--second_corpus=/nonexistent/*.txt"], 1,
     "--second_corpus='/nonexistent/*.txt': one of ('python-doc', 'pydoc-topics', 'none')"),
])
def test_bad_input_is_a_clear_error(args, code, message):
    proc = run_cli(args, check=False)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    flags = {**SMALL_FLAGS, "schedule.total_tokens": 8 * 32 * 60, "logging.eval_every_steps": 30}
    proc = run_cli(["train", f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
                    *overrides_to_flags(flags)])
    return workdir, proc


def test_train_end_to_end(trained):
    workdir, proc = trained
    out = proc.stdout
    result = json.loads((workdir / "result.json").read_text())
    assert set(result) >= {"N", "N_nonembed", "tokens", "flops", "val_loss", "wall_s"}
    assert result["tokens"] == 60 * 256
    # The summary prints the validation loss next to the corpus's unigram entropy.
    assert f"validation loss {result['val_loss']:.4f}" in out
    assert f"unigram entropy of the corpus {result['unigram_entropy']:.4f}" in out
    assert result["val_loss"] < 6.0  # well below log(512) = 6.24 after 60 steps
    # Not a terminal: plain progress lines.
    assert re.search(r"^step 60/60  loss \d+\.\d+  lr \S+  tokens/s [\d,]+$", out, re.M)
    assert (workdir / "metrics.jsonl").exists() and (workdir / "tensorboard").is_dir()


def test_train_refuses_finished_workdir(trained):
    workdir, _ = trained
    proc = run_cli(["train", f"--workdir={workdir}"], check=False)
    assert proc.returncode == 1 and "never overwritten" in proc.stderr


def test_eval_command(trained):
    workdir, _ = trained
    result = json.loads((workdir / "result.json").read_text())
    out = json.loads(run_cli(["eval", f"--workdir={workdir}"]).stdout)
    assert out["step"] == 60
    assert out["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_prepare_then_train_on_array_record(tmp_path, trained):
    text = "\n\n".join(pydoc_data.topics.topics.values())
    (tmp_path / "docs.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "prepared"
    proc = run_cli(["prepare", f"--input={tmp_path}/*.txt", f"--out={out}", "--vocab_size=512",
                    "--val_every_nth_doc=10", "--record_tokens=4096"])
    assert "--config.data.source=array_record" in proc.stdout
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["vocab_size"] == 512 and meta["splits"]["validation"]["tokens"] > 0
    workdir = tmp_path / "run"
    run_cli(["train", f"--workdir={workdir}", "--config.data.source=array_record",
             f"--config.data.path={out}", *overrides_to_flags(SMALL_FLAGS)])
    result = json.loads((workdir / "result.json").read_text())
    assert result["val_loss"] < 6.3
    again = run_cli(["prepare", f"--input={tmp_path}/*.txt", f"--out={out}"], check=False)
    assert again.returncode == 1 and "is not an empty directory" in again.stderr


@pytest.mark.slow
def test_bench_reports_mfu():
    flags = {k: v for k, v in SMALL_FLAGS.items() if k.startswith("model.")}
    out = run_cli(["bench", "--steps=3", *overrides_to_flags(flags)]).stdout
    mfu = float(re.search(r"^MFU\s+([\d.]+)%", out, re.M).group(1))
    assert 0.0 < mfu < 150.0
    assert re.search(r"^tokens/s\s+[\d,]+$", out, re.M)
    shares = re.search(r"^time split\s+forward (\d+)%, backward (\d+)%, optimizer update \+ "
                       r"rest ~?(\d+)%", out, re.M).groups()
    assert sum(map(int, shares)) == 100, out
    hint = "--config.model.matmul_precision=bfloat16 runs about 1.5x faster"
    assert (hint in out) == kernels.cpu_has_bf16_dot()
    bf16 = {**flags, "model.matmul_precision": "bfloat16"}
    out = run_cli(["bench", "--steps=2", *overrides_to_flags(bf16)]).stdout
    assert "matmul operands bfloat16" in out and hint not in out


def test_bench_time_split_adds_up_under_load():
    """Forward + backward timed longer than the step (a loaded machine printed 21% + 91% +
    0%): the shares still add up, and the report says the update is within the noise."""
    from qat_jax.tools import bench

    text = bench.time_split_text({"split_step_s": 1.0, "forward_s": 0.21, "backward_s": 0.91})
    assert text.startswith("forward 19%, backward 81%, optimizer update + rest ~0%")
    assert "112% of the step" in text
    text = bench.time_split_text({"split_step_s": 1.0, "forward_s": 0.25, "backward_s": 0.6})
    assert text.startswith("forward 25%, backward 60%, optimizer update + rest 15%")


def test_bench_lists_ops_by_time():
    """--ops=N: a profile of the step, op by op, named after the model code; matmuls are among
    the largest, and the shares of the listed ops sum to at most 1. (At this size an op takes
    under a millisecond, so the order within the top few moves with the machine's load.)"""
    flags = {k: v for k, v in SMALL_FLAGS.items() if k.startswith("model.")}
    out = run_cli(["bench", "--steps=2", "--ops=8", *overrides_to_flags(flags)]).stdout
    rows = re.findall(r"^\s+([\d.]+) ms\s+([\d.]+)%  (\S+)$", out, re.M)
    assert len(rows) == 8, out
    assert any("dot_general" in op for _, _, op in rows)
    assert sum(op.startswith("Decoder/") for _, _, op in rows) >= 4, rows
    assert sum(float(share) for _, share, _ in rows) <= 100.5
    assert [float(ms) for ms, _, _ in rows] == sorted((float(ms) for ms, _, _ in rows),
                                                      reverse=True)


@pytest.mark.slow
def test_bench_qat_overhead():
    flags = {k: v for k, v in SMALL_FLAGS.items() if k.startswith("model.")}
    out = run_cli(["bench", "--steps=2", "--qat_bits=2,4", *overrides_to_flags(flags)]).stdout
    ratios = re.findall(r"^QAT\s+(\d+)-bit\s+[\d.]+ ms  ratio ([\d.]+)$", out, re.M)
    assert [b for b, _ in ratios] == ["2", "4"]
    assert all(0.5 < float(r) < 5.0 for _, r in ratios)
    bad = run_cli(["bench", "--qat_bits=7"], check=False)
    assert bad.returncode == 2 and "--qat_bits: quant.bits=7.0 is not supported" in bad.stderr


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("qat") / "run"
    run_cli(["train", f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
             "--config.quant.bits=2", "--config.qat.fraction_policy=fixed",
             "--config.qat.fraction=0.5",
             *overrides_to_flags(SMALL_FLAGS)])
    return workdir


def test_eval_reports_fp_and_quantized(qat_run):
    result = json.loads((qat_run / "result.json").read_text())
    proc = run_cli(["eval", f"--workdir={qat_run}"])
    out = json.loads(proc.stdout)
    assert "WARNING" not in proc.stderr, proc.stderr  # orbax's routine read-only notices
    assert out["bits"] == 2.0
    assert out["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)  # the served model
    assert out["val_loss_fp"] != pytest.approx(out["val_loss"], abs=1e-4)
    assert out["val_ppl_fp"] == pytest.approx(2.718281828 ** out["val_loss_fp"], rel=1e-6)


def test_export_command_parity(qat_run, tmp_path, cache_dir):
    """The exported packed model gives the quantized model's validation loss."""

    out = tmp_path / "m.safetensors"
    proc = run_cli(["export", f"--workdir={qat_run}", f"--out={out}", "--dtype=float32"])
    assert re.search(r"at 2 bits, [\d,]+ bytes packed = 0\.12\d\d of their bf16 size", proc.stdout)
    assert re.search(r"the rest float32\) = [\d.]+ of the model in bf16", proc.stdout)
    config_dict, params = packed.load(out)
    config = runconfig.load_run_config(qat_run)
    with config.unlocked():
        config.quant.bits = None
    net = model.Decoder(model.ModelConfig.from_config(config))
    spec = resolve.data_spec(config)
    batches = data.validation_batches(data.load_corpus(spec), spec)
    loss = float(np.mean([trainstep.loss_fn(params, b, net=net) for b in batches]))
    result = json.loads((qat_run / "result.json").read_text())
    assert loss == pytest.approx(result["val_loss"], abs=1e-5)
    assert config_dict["quant"]["bits"] == 2.0
    again = run_cli(["export", f"--workdir={qat_run}", f"--out={out}"], check=False)
    assert again.returncode == 1 and "nothing is overwritten" in again.stderr


def test_export_refuses_fp_run(trained, tmp_path):
    workdir, _ = trained
    proc = run_cli(["export", f"--workdir={workdir}", f"--out={tmp_path / 'x'}"], check=False)
    assert proc.returncode == 1 and "full-precision run has no quantized model" in proc.stderr


ROOT = Path(__file__).resolve().parents[1]
DOC_PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def _documented_commands() -> dict[str, set[str]]:
    """{subcommand: the flags the README and docs/ pages give it}: every `qat-jax CMD ...` line
    of their code blocks (continuations joined) and of the README's commands table."""
    out = {}
    for page in DOC_PAGES:
        text = (ROOT / page).read_text().replace("\\\n", " ")
        for m in re.finditer(r"(?:^|[`&|;]\s*|^\S+=\S+\s+)qat-jax ([a-z]\w*)([^`\n]*)", text, re.M):
            flags = set(re.findall(r"--(?!config\.)([a-z_]+)", m.group(2)))
            out.setdefault(m.group(1), set()).update(flags)
    return out


def test_documented_commands_and_flags_exist():
    """Every `qat-jax` command the README and the docs/ pages show is a command, and every flag
    they give it is in its --help (the pages' commands stay true)."""
    documented = _documented_commands()
    assert {"train", "eval", "prepare", "bench", "export", "generate", "fit", "plan", "sweep",
            "repro", "compile"} <= set(documented)
    for command, flags in documented.items():
        help_text = run_cli([command, "--help"]).stdout
        missing = sorted(f for f in flags if not re.search(rf"--(\[no\])?{f}\b", help_text))
        assert not missing, f"qat-jax {command}: the docs give {missing}, its --help lacks them"


def test_readmes_python_example_runs(tmp_path, monkeypatch):
    """The README's Python example runs as written (its law.json: the committed study's)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    shutil.copy(ROOT / "docs" / "repro" / "law.json", tmp_path / "law.json")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    f, loss = scope["planner"].optimal_fraction(scope["fitted"], N=1e9, D=2e10, B=4)
    assert 0.0 <= f <= 1.0 and loss > 0


def test_a_config_file_is_executed_once(tmp_path, monkeypatch):
    """`--config=FILE` runs FILE once (it was run three times: config_flags' default, the file
    checked by runconfig, and config_flags' parse of it), and its overrides still apply."""
    from qat_jax import cli

    count = tmp_path / "count"
    count.write_text("")
    cfg = tmp_path / "counted.py"
    cfg.write_text(f"import pathlib\nfrom qat_jax.configs import tiny\n"
                   f"p = pathlib.Path({str(count)!r}); p.write_text(p.read_text() + 'x')\n"
                   f"def get_config():\n    return tiny.get_config()\n")
    monkeypatch.syspath_prepend(str(ROOT))
    fv = cli._parse("train", [f"--config={cfg}", "--config.seed=3"])
    assert count.read_text() == "x"
    assert fv.config.seed == 3 and fv.config.model.d_model == tiny_d_model()
    from qat_jax import cli_process
    assert cli_process.config_file(fv) == str(cfg)


def tiny_d_model() -> int:
    from qat_jax.configs import tiny
    return tiny.get_config().model.d_model
