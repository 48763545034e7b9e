import functools
import json
import math

import jax
import numpy as np
import pytest
from conftest import run_python, small_config

from qat_jax import data, model, resolve, runconfig, rundir, sharding, train, trainstep

# Its module-scoped fixtures are built once: its tests run on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("train")


def _setup(config):
    mesh = sharding.make_mesh(resolve.mesh_spec(config))
    return mesh, trainstep.Setup.create(resolve.planned(config), mesh)


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.model.vocab_size,
                        (config.data.batch_size, config.model.seq_len + 1)).astype(np.int32)


def test_config_with_copies_and_locks(tmp_path):
    config = small_config(str(tmp_path))
    c = runconfig.config_with(config, **{"quant.bits": 4.0, "model.d_model": 96})
    assert (c.quant.bits, c.model.d_model) == (4.0, 96)
    assert (config.quant.bits, config.model.d_model) == (None, 64)  # the original unchanged
    assert runconfig.config_diffs(json.loads(config.to_json_best_effort()), c) == [
        "model.d_model: 64 -> 96", "quant.bits: None -> 4.0"]
    with pytest.raises(AttributeError):
        c.quant.new_key = 1  # still locked


def test_train_step_fits_a_batch(tmp_path):
    config = small_config(str(tmp_path), **{"schedule.warmup_frac": 0.0})
    mesh, setup = _setup(config)
    with jax.set_mesh(mesh), sharding.axis_rules():
        state = setup.init(jax.random.key(0))
        tokens = sharding.shard_batch(_batch(config), mesh)
        losses = []
        for _ in range(15):
            state, m = setup.fp.step(state, tokens)
            losses.append(float(m["loss"]))
    assert int(state.step) == 15
    assert losses[0] == pytest.approx(math.log(512), abs=0.3)
    assert losses[-1] < losses[0] - 1.0


def test_grad_accumulation_matches_full_batch(tmp_path):
    config = small_config(str(tmp_path))
    net = model.Decoder(model.ModelConfig.from_config(config))
    params = jax.device_get(_setup(config)[1].init(jax.random.key(0)).params)
    tokens = _batch(config)
    full = trainstep.grads_and_loss(params, tokens, net=net, grad_accum_steps=1)
    accum = jax.jit(functools.partial(trainstep.grads_and_loss, net=net, grad_accum_steps=4))(
        params, tokens)
    assert float(full[0]) == pytest.approx(float(accum[0]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(full[1]), jax.tree.leaves(accum[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6 * float(np.abs(a).max()) + 1e-9, rtol=1e-4)
    # Micro-batches are real: one of them alone gives a different gradient.
    part = trainstep.grads_and_loss(params, tokens[::4], net=net, grad_accum_steps=1)
    assert abs(float(part[0]) - float(full[0])) > 1e-4


SHARDED_CHECK = """
import functools, jax, numpy as np
from conftest import fixed_fraction, small_config
from qat_jax import resolve, sharding, trainstep
assert jax.device_count() == 8
out = {}
tokens = [np.random.default_rng(i).integers(0, 512, (8, 33)).astype(np.int32) for i in range(3)]
for name, mesh_cfg, devices in [("one", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                               ("dp_fsdp_tp", dict(data=2, fsdp=2, tensor=2), None)]:
    config = small_config("CACHE", **{f"mesh.{k}": v for k, v in mesh_cfg.items()},
                          **{"quant.bits": BITS, **fixed_fraction(1)})
    mesh = sharding.make_mesh(resolve.mesh_spec(config), devices)
    setup = trainstep.Setup.create(resolve.planned(config), mesh)
    grads = jax.jit(functools.partial(trainstep.grads_and_loss, net=setup.net, grad_accum_steps=1))
    with jax.set_mesh(mesh), sharding.axis_rules():
        state = setup.served.enter(setup.init(jax.random.key(0)))  # QAT: from step 0
        step_fn = setup.served.step
        if name != "one":
            # Parameters really are sharded: the q kernel is split over fsdp x tensor.
            spec = state.params["block_0"]["attn"]["q"]["kernel"].sharding.spec
            assert tuple(spec) == ("fsdp", "tensor"), spec
            # Its quantizer scale is sharded along the weight's output axis.
            spec = state.params["block_0"]["attn"]["q"]["quant_scale"].sharding.spec
            assert tuple(spec) in ((None, "tensor"),), spec
            scalars = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
            assert scalars and all(x.sharding.is_fully_replicated for x in scalars)  # Adam's count
        g = jax.device_get(grads(state.params, sharding.shard_batch(tokens[0], mesh))[1])
        losses = []
        for t in tokens:
            state, m = step_fn(state, sharding.shard_batch(t, mesh))
            losses.append(float(m["loss"]))
        out[name] = (g, losses, jax.device_get(state.params))
(g1, l1, p1), (g8, l8, p8) = out["one"], out["dp_fsdp_tp"]
np.testing.assert_allclose(l1, l8, rtol=1e-5)
for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
# Adam's updates are ~lr * sign(g) (lr 3e-3): a tiny gradient's sign may differ, not more.
diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
assert diff < 3e-3 * 0.1, diff
print("max param diff", diff)
"""


@pytest.mark.slow
@pytest.mark.parametrize("bits", [None, 2.0])
def test_sharded_step_matches_single_device(cache_dir, bits):
    """Three steps on an 8-device mesh (data 2 x fsdp 2 x tensor 2) equal one device's, full
    precision and with 2-bit QAT."""
    code = SHARDED_CHECK.replace("CACHE", cache_dir).replace("BITS", repr(bits))
    out = run_python("import sys; sys.path.insert(0, 'tests')\n" + code, n_devices=8)
    assert "max param diff" in out


ACCUM_CHECK = """
import functools, jax, numpy as np
from conftest import fixed_fraction, small_config
from qat_jax import resolve, runconfig, sharding, trainstep
from qat_jax.tools import aot, hlo

tokens = np.random.default_rng(0).integers(0, 512, (32, 129)).astype(np.int32)
base = {"quant.bits": 2.0, **fixed_fraction(1),
        "data.batch_size": 32, "model.seq_len": 128,
        "model.attention": "splash", "model.attention_block": 128, "model.scan_layers": True}
out = {}
for name, mesh_cfg, devices, accum in [
        ("one", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], 1),
        ("8", dict(data=2, fsdp=2, tensor=2), None, 4)]:
    config = small_config("CACHE", **{f"mesh.{k}": v for k, v in mesh_cfg.items()}, **base,
                          **{"optimizer.grad_accum_steps": accum})
    mesh = sharding.make_mesh(resolve.mesh_spec(config), devices)
    setup = trainstep.Setup.create(resolve.planned(config), mesh)
    specs = jax.tree.map(lambda x: x.sharding.spec, setup.abstract_state.params)
    grads = jax.jit(functools.partial(trainstep.grads_and_loss, net=setup.net,
                                      grad_accum_steps=accum, param_specs=specs))
    with jax.set_mesh(mesh), sharding.axis_rules():
        state = setup.served.enter(setup.init(jax.random.key(0)))
        loss, g = grads(state.params, sharding.shard_batch(tokens, mesh))
        out[name] = (float(loss), jax.device_get(g))
assert abs(out["one"][0] - out["8"][0]) < 1e-5, (out["one"][0], out["8"][0])
for a, b in zip(jax.tree.leaves(out["one"][1]), jax.tree.leaves(out["8"][1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))

# Communication: on data 4 x fsdp 2 the micro-step loop holds no collective; the plain scan over
# micro-batches (GSPMD's choice) reduces every gradient in each micro-step.
config = small_config("CACHE", **{"mesh.data": 4, "mesh.fsdp": 2, "data.batch_size": 32,
                                  "optimizer.grad_accum_steps": 4})
mesh = sharding.make_mesh(resolve.mesh_spec(config))
setup = trainstep.Setup.create(resolve.planned(config), mesh)
specs = jax.tree.map(lambda x: x.sharding.spec, setup.abstract_state.params)
batch = jax.ShapeDtypeStruct((32, 33), np.int32, sharding=sharding.batch_sharding(mesh))
loop = {}
for name, ps in [("per_device", specs), ("plain", None)]:
    step = jax.jit(functools.partial(trainstep.train_step, net=setup.fp.net, tx=setup.tx,
                                     grad_accum_steps=4, param_specs=ps))
    with jax.set_mesh(mesh), sharding.axis_rules():
        text = step.lower(setup.abstract_state, batch).compile().as_text()
    loop[name] = sum(v["bytes"] for v in hlo.loop_collectives(text).values())
assert loop["per_device"] == 0 and loop["plain"] > 0, loop
# qat-jax compile counts every micro-step: the FLOPs of accumulation 4 are those of one batch.
one, four = (aot.compile_step(runconfig.config_with(config, **{
    "optimizer.grad_accum_steps": a}), jax.devices()) for a in (1, 4))
assert four["loop_collectives"] and not any(v["count"] for v in four["loop_collectives"].values())
assert abs(four["flops"] / one["flops"] - 1) < 0.05, (four["flops"], one["flops"])
print("accumulation ok", loop)
"""


@pytest.mark.slow
def test_grad_accumulation_per_device(cache_dir):
    """Accumulation over 4 micro-batches on data 2 x fsdp 2 x tensor 2 (2-bit QAT, splash, scanned
    layers) gives one device's full-batch gradient; its micro-step loop does no communication,
    and qat-jax compile counts all of its FLOPs."""
    out = run_python("import sys; sys.path.insert(0, 'tests')\n" +
                     ACCUM_CHECK.replace("CACHE", cache_dir), n_devices=8)
    assert "accumulation ok" in out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("run")
    config = small_config(cache_dir, **{"logging.tensorboard": True})
    result = train.train(resolve.resolve(config), workdir)
    return config, workdir, result


def test_run_outputs(finished_run):
    config, workdir, result = finished_run
    for key in ("N", "N_nonembed", "tokens", "flops", "val_loss", "val_ppl", "wall_s",
                "unigram_entropy", "steps"):
        assert key in result
    assert result["steps"] == 20 and result["tokens"] == 20 * 8 * 32
    flops_per_token = train.sizes.flops_per_token(train.sizes.ModelSpec.from_config(config))
    assert result["flops"] == pytest.approx(result["tokens"] * flops_per_token)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert json.loads((workdir / "result.json").read_text()) == result
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    assert all(r["tokens"] == r["step"] * 256 and r["tokens_per_s"] > 0 for r in train_records)
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    val_records = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val_records] == [10, 20]
    assert val_records[-1]["val_loss"] == pytest.approx(result["val_loss"])
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["d_model"] == 64
    assert train.ckpt.Checkpoints(workdir, 3).steps() == [10, 15, 20]


def test_tensorboard_events_readable(finished_run):
    _, workdir, _ = finished_run
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [5, 10, 15, 20]


def test_finished_workdir_is_not_overwritten(finished_run):
    config, workdir, _ = finished_run
    before = (workdir / "result.json").read_text()
    with pytest.raises(train.RunError, match="finished run"):
        train.train(resolve.resolve(config), workdir)
    assert (workdir / "result.json").read_text() == before


def test_resume_with_another_config_refused(tmp_path, cache_dir):
    config = small_config(cache_dir)
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    other = small_config(cache_dir, **{"model.d_model": 128})
    with pytest.raises(train.RunError, match=r"model.d_model: 64 -> 128"):
        train.train(resolve.resolve(other), tmp_path)
    # Logging / checkpoint / mesh keys may change on resume.
    rundir.check(tmp_path, small_config(cache_dir, **{"logging.every_steps": 2}))


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, cache_dir):
    config = small_config(cache_dir, **{"optimizer.peak_lr": 1e6, "optimizer.grad_clip_norm": 0.0,
                                        "schedule.warmup_frac": 0.0, "logging.every_steps": 1,
                                        "checkpoint.every_steps": 1})
    diverged = r"training diverged \(non-finite loss or parameters: .*\) at step \d+"
    with pytest.raises(train.RunError, match=diverged) as e:
        train.train(resolve.resolve(config), tmp_path)
    steps = train.ckpt.Checkpoints(tmp_path, 3).steps()
    assert not (tmp_path / "result.json").exists()
    assert steps, "the checkpoints before the divergence are kept"
    assert str(e.value).endswith(f"Last good checkpoint: step {steps[-1]}. Lower optimizer.peak_lr "
                                 f"or raise schedule.warmup_frac")
    # The kept checkpoint holds finite parameters.
    from qat_jax import sharding

    mesh = sharding.make_mesh(resolve.mesh_spec(config))
    setup = trainstep.Setup.create(resolve.planned(config), mesh)
    _, state = train.ckpt.Checkpoints(tmp_path, 3).restore_latest(setup.abstract_state)
    assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(state.params))


def test_a_failed_start_leaves_the_workdir_as_it_found_it(tmp_path, cache_dir):
    """A new run that fails before its first checkpoint (here it diverges at once) removes
    what it wrote: a workdir it made is gone, one that held the user's files holds just those;
    the corrected command is then accepted there (no config.json of the failed start)."""
    bad = small_config(cache_dir, **{"optimizer.peak_lr": 1e6, "optimizer.grad_clip_norm": 0.0,
                                     "schedule.warmup_frac": 0.0, "logging.every_steps": 1,
                                     "checkpoint.every_steps": 1000})
    made = tmp_path / "new"
    with pytest.raises(train.RunError, match="training diverged"):
        train.train(resolve.resolve(bad), made)
    assert not made.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(train.RunError, match="training diverged"):
        train.train(resolve.resolve(bad), mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    rundir.check(mine, small_config(cache_dir))  # the fix is not refused


def test_checkpoints_of_another_model_are_a_mismatch_not_damage(finished_run, tmp_path,
                                                                  cache_dir):
    """A run's checkpoints without its config.json, resumed with another model: refused as a
    config mismatch naming the arrays that differ, before any config.json is written, and no
    checkpoint is moved to damaged_checkpoints/; the config they were trained with resumes."""
    import shutil

    config, workdir, _ = finished_run
    d = tmp_path / "run"
    d.mkdir()
    shutil.copytree(workdir / "checkpoints", d / "checkpoints")
    steps = sorted(p.name for p in (d / "checkpoints").iterdir())
    other = small_config(cache_dir, **{"model.d_model": 128, "schedule.total_tokens": 40 * 256})
    with pytest.raises(train.ckpt.CheckpointError, match=r"holds another model than this "
                                                         r"config's .*nothing was moved"):
        train.train(resolve.resolve(other), d)
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == steps
    assert not (d / "damaged_checkpoints").exists() and not (d / "config.json").exists()
    longer = small_config(cache_dir, **{"logging.tensorboard": True,
                                        "schedule.total_tokens": 25 * 256})
    out = train.train(resolve.resolve(longer), d)  # its own model: resumed from step 20, not from 0
    assert out["steps"] == 25
    assert [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)] == [25]


def test_workdirs_that_would_lose_or_mix_work_are_refused(tmp_path, cache_dir):
    """Before anything compiles: a run whose metrics went past its first checkpoint but whose
    checkpoints/ is gone (it would restart at step 0 and drop its metrics), a checkpoints/
    that is a file, a run in a sweep's directory and a sweep in a run's; nothing is written."""
    from qat_jax.errors import UserError
    from qat_jax.tools import sweep

    config = small_config(cache_dir)
    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "config.json").write_text(config.to_json_best_effort())
    (lost / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0}) + "\n"
                                                for s in (5, 10, 15)))
    with pytest.raises(train.RunError, match=r"metrics up to step 15 but no checkpoint .*were "
                                             r"its checkpoints/ removed"):
        train.train(resolve.resolve(config), lost)
    (lost / "checkpoints").write_text("not a directory")
    with pytest.raises(train.RunError, match=r"checkpoints is a file, not the run's checkpoints "
                                             r"directory"):
        train.train(resolve.resolve(config), lost)
    # Every entry of a run's workdir, of the wrong type, is refused before anything compiles.
    for name, is_dir in rundir.ENTRIES.items():
        odd = tmp_path / f"odd-{name}"
        odd.mkdir()
        (odd / name).mkdir() if not is_dir else (odd / name).write_text("x")
        with pytest.raises(train.RunError, match=rf"{name} is a {'file' if is_dir else 'dir'}"):
            train.train(resolve.resolve(config), odd)
    swept = tmp_path / "sweep"
    (swept / "trunk").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds a sweep's files \(trunk\), not a run's"):
        train.train(resolve.resolve(config), swept)
    with pytest.raises(UserError, match=r"holds a run's files \(config.json, checkpoints\), not "
                                              r"a sweep's"):
        sweep.run_sweep(config, lost.parent / "lost", [0.5], [2.0], (True,))
    def names(d):  # the lock file (files.WorkdirLock) stays by design
        return sorted(p.name for p in d.iterdir() if p.name != ".qat_jax.lock")

    assert names(lost) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert names(swept) == ["trunk"]
    # A directory of workdirs (workdirs/, a sweep's runs/) is no one run, sweep or study.
    from qat_jax.study import grids, repro
    many = tmp_path / "workdirs"
    for name in ("a", "b"):
        (many / name).mkdir(parents=True)
        (many / name / "config.json").write_text("{}")
    (many / "notes.txt").write_text("mine")
    message = r"workdirs holds other qat-jax workdirs \(a, b\), not a {} of its own"
    with pytest.raises(UserError, match=message.format("run")):
        train.train(resolve.resolve(config), many)
    with pytest.raises(UserError, match=message.format("sweep")):
        sweep.run_sweep(config, many, [0.5], [2.0], (True,))
    with pytest.raises(UserError, match=message.format("study")):
        repro.run(config, many, grids.GRIDS["quick"], "none")
    assert names(many) == ["a", "b", "notes.txt"]


def test_load_run_config_round_trip(finished_run):
    config, workdir, _ = finished_run
    loaded = runconfig.load_run_config(workdir)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.optimizer.peak_lr, float) and loaded.is_locked


def test_itstime():
    """Every N steps, and at the last step unless last=False (the loop's log, eval and
    checkpoint tests)."""
    assert [d for d in range(1, 13) if train.itstime(d, 5, 12)] == [5, 10, 12]
    assert [d for d in range(1, 13) if train.itstime(d, 5, 12, last=False)] == [5, 10]
    assert [d for d in range(1, 11) if train.itstime(d, 5, 10)] == [5, 10]


def test_older_config_json_loads_and_resumes(tmp_path):
    """A config.json from before a key was renamed (model.remat) or added (model.attention,
    the compile group) loads with today's keys and is no difference for a resume, as long as
    the new keys keep their defaults."""
    config = small_config(str(tmp_path))
    old = json.loads(config.to_json_best_effort())
    for key in ("remat_policy", "attention", "attention_block", "loss_chunk_len"):
        del old["model"][key]
    del old["compile"]
    old["model"]["remat"] = True
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = runconfig.load_run_config(tmp_path)
    assert loaded.model.remat_policy == "full" and loaded.model.attention == "auto"
    full = runconfig.config_with(config, **{"model.remat_policy": "full"})
    assert runconfig.config_diffs(old, full) == []
    assert runconfig.config_diffs(old, config) == ["model.remat_policy: 'full' -> 'none'"]
    chunked = runconfig.config_with(full, **{"model.loss_chunk_len": 8})
    assert runconfig.config_diffs(old, chunked) == ["model.loss_chunk_len: 0 -> 8"]


def test_auto_precision_is_recorded_and_kept_on_resume(tmp_path, cache_dir, monkeypatch):
    """model.matmul_precision='auto' is this host's choice for a new run, written into its
    config.json; a resume on a host that would choose otherwise keeps the run's value, and an
    explicit other value is refused as a changed config."""
    from qat_jax import kernels

    config = small_config(cache_dir, **{"model.matmul_precision": "auto"})
    monkeypatch.setattr(kernels, "cpu_has_bf16_dot", lambda: True)
    out = train.train(resolve.resolve(config), tmp_path, train.Segment(stop_at=5))
    assert out == {"stopped_at": 5}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["matmul_precision"] == "bfloat16"
    monkeypatch.setattr(kernels, "cpu_has_bf16_dot", lambda: False)  # another CPU
    assert rundir.pin_auto(config, tmp_path).model.matmul_precision == "bfloat16"
    assert rundir.pin_auto(config, tmp_path / "new").model.matmul_precision == "float32"
    f32 = runconfig.config_with(config, **{"model.matmul_precision": "float32"})
    with pytest.raises(train.RunError, match="model.matmul_precision: 'bfloat16' -> 'float32'"):
        train.train(resolve.resolve(f32), tmp_path)
    built, create = [], trainstep.Setup.create.__func__  # the precision the model is built in
    monkeypatch.setattr(trainstep.Setup, "create", classmethod(
        lambda cls, run, mesh: built.append(run.execution.matmul_precision) or create(
            cls, run, mesh)))
    result = train.train(resolve.resolve(config), tmp_path)
    assert math.isfinite(result["val_loss"]) and built == ["bfloat16"]
    assert json.loads((tmp_path / "config.json").read_text())["model"]["matmul_precision"] == (
        "bfloat16")


def test_a_run_saved_before_auto_precision_resumes_in_float32(tmp_path, monkeypatch):
    """A config.json written when float32 was the default (with the key, or from before it)
    keeps float32 under today's 'auto', on a CPU whose own choice would be bfloat16."""
    from qat_jax import kernels

    monkeypatch.setattr(kernels, "cpu_has_bf16_dot", lambda: True)
    config = small_config(str(tmp_path), **{"model.matmul_precision": "auto"})
    old = json.loads(small_config(str(tmp_path)).to_json_best_effort())  # 'float32'
    for keep in (True, False):
        if not keep:
            del old["model"]["matmul_precision"]
        (tmp_path / "config.json").write_text(json.dumps(old))
        pinned = rundir.pin_auto(config, tmp_path)
        assert pinned.model.matmul_precision == "float32"
        assert runconfig.config_diffs(old, pinned) == []
        assert runconfig.load_run_config(tmp_path).model.matmul_precision == "float32"
    bf16 = runconfig.config_with(config, **{"model.matmul_precision": "bfloat16"})
    assert runconfig.config_diffs(old, bf16) == ["model.matmul_precision: 'float32' -> 'bfloat16'"]


@pytest.mark.parametrize("old_value,policy,fraction", [
    ("auto", "auto", None), ("law", "law", None), ("0.3", "fixed", 0.3), ("1", "fixed", 1.0)])
def test_older_qat_fraction_splits_into_policy_and_number(tmp_path, old_value, policy, fraction):
    """qat.fraction once held the policy or the number as one string: an old config.json loads
    as qat.fraction_policy and the number, and resumes under the new keys without a diff."""
    config = small_config(str(tmp_path), **{"quant.bits": 4.0, "qat.fraction_policy": policy,
                                            "qat.fraction": fraction})
    old = json.loads(config.to_json_best_effort())
    del old["qat"]["fraction_policy"]
    old["qat"]["fraction"] = old_value
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = runconfig.load_run_config(tmp_path)
    assert (loaded.qat.fraction_policy, loaded.qat.fraction) == (policy, fraction)
    assert runconfig.config_diffs(old, config) == []
    other = runconfig.config_with(config, **{"qat.fraction_policy": "fixed", "qat.fraction": 0.5})
    assert runconfig.config_diffs(old, other) != []


def test_data_order_is_the_iterator(finished_run, cache_dir):
    """The run consumed exactly the first 20 batches of the data pipeline (recorded position)."""
    config, workdir, _ = finished_run
    corpus = data.load_corpus(resolve.data_spec(config))
    it = data.train_iterator(corpus, resolve.data_spec(config))
    for _ in range(20):
        next(it)
    saved = json.loads((workdir / "checkpoints" / "20" / "data" /
                        "process_0-of-1.json").read_text())
    assert saved == it.get_state()


def test_saved_config_with_an_unknown_key_is_named(tmp_path):
    from qat_jax.errors import UserError

    saved = json.loads(small_config(str(tmp_path)).to_json_best_effort())
    saved["model"]["n_experts"] = 8
    with pytest.raises(UserError, match=r"export.json: unknown key model.n_experts"):
        runconfig.config_from_saved(saved, "export.json")
