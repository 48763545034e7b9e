"""Bad inputs at the command line: flags, config files, law files and runs tables that no
command can use are refused with one line naming what is wrong and what would be valid,
before any work, and nothing already written is touched."""

import json
from pathlib import Path

import pytest
from conftest import SMALL_FLAGS, overrides_to_flags


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
    ("from configs import base\ndef get_config():\n    return base.get_config()\n",
     "No module named 'configs'; the shipped configs live in the package now: `from "
     "qat_jax.configs import base`"),
    ("from qat_jax.configs import base\ndef get_config():\n    c = base.get_config()\n"
     "    c.model.dmodel = 64\n    return c\n",
     "get_config() adds key model.dmodel, which qat_jax/configs/base.py does not declare; did "
     "you mean d_model?"),
    ("from qat_jax.configs import base\ndef get_config():\n    c = base.get_config()\n"
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
