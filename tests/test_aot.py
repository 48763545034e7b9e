"""`qat-jax compile` (qat_jax/tools/aot.py): the train step compiled ahead of time, its memory,
FLOPs, collectives and roofline; the search for settings that fit."""

import importlib.util

import jax
import numpy as np
import pytest
from conftest import SMALL_FLAGS, fixed_fraction, overrides_to_flags, run_cli, small_config

from qat_jax import resolve, runconfig, sharding, sizes, trainstep
from qat_jax.tools import aot, chips, hlo

HLO = """
ENTRY %main {
  %ag = (f32[8,16]{1,0}, f32[64,16]{1,0}) all-gather-start(f32[8,16]{1,0} %p), dimensions={0}
  %ag.done = f32[64,16]{1,0} all-gather-done((f32[8,16]{1,0}, f32[64,16]{1,0}) %ag)
  %ar = bf16[1024]{0} all-reduce(bf16[1024]{0} %g), to_apply=%add
  %rs.1 = f32[4,4]{1,0} reduce-scatter(f32[16,4]{1,0} %h), dimensions={0}
  ROOT %t = (f32[64,16]{1,0}) tuple(%ag.done)
}
"""


def test_collectives_are_counted_with_their_bytes():
    c = hlo.collectives(HLO)
    assert c["all-gather"] == {"count": 1, "bytes": 64 * 16 * 4}  # the gathered buffer, once
    assert c["all-reduce"] == {"count": 1, "bytes": 1024 * 2}
    assert c["reduce-scatter"] == {"count": 1, "bytes": 4 * 4 * 4}
    assert c["all-to-all"]["count"] == c["collective-permute"]["count"] == 0


def test_roofline_arithmetic(tmp_path):
    config = small_config(str(tmp_path))
    n = sizes.param_count(*sizes.specs(config))["total"]
    six_nd = 6 * n * config.data.batch_size * config.model.seq_len / 2
    step = {"flops": 2 * six_nd, "hbm_bytes": 3e9,
            "collectives": {"all-gather": {"count": 2, "bytes": 1e9}}}
    chip = chips.Chip(hbm_bytes=1e10, peak_flops=six_nd, hbm_bw=1e9, ici_bw=1e8)
    r = aot.roofline(step, config, 2, chip)
    assert r["flops_over_6nd"] == pytest.approx(2.0)
    assert r["times"] == pytest.approx({"compute": 2.0, "memory": 3.0, "network": 10.0})
    assert (r["bound"], r["step_s"]) == ("network", pytest.approx(10.0))
    assert r["mfu_bound"] == pytest.approx(0.1)  # 1 s of useful compute in 10 s


@pytest.mark.slow
def test_compile_reports_and_searches(tmp_path):
    """One CPU device: the real FP and QAT steps compile; a memory budget below the plain
    step's total is met by a setting the search finds (and says), none when nothing can."""
    config = small_config(str(tmp_path), **{"model.vocab_size": 4096, "model.seq_len": 128,
                                            "quant.bits": 4.0, **fixed_fraction(0.5)})
    devices = jax.devices()[:1]
    report = aot.run(config, None, 1, hbm=1e12, suggest=6)
    fp, qat = report["steps"]
    assert (fp["phase"], qat["phase"]) == ("fp", "qat") and fp["fits"] and qat["fits"]
    assert fp["memory"]["total"] > fp["memory"]["temporaries"] > 0
    assert 1.0 < fp["roofline"]["flops_over_6nd"] < 1.5  # attention and the loss on top of 6ND
    assert report["suggestion"] is None and "suggest_tries" not in report
    budget = 0.9 * fp["memory"]["total"]
    found = aot.search(config, devices, budget, max_tries=6)
    assert found is not None and found["step"]["memory"]["total"] <= budget
    assert found["overrides"]["model.loss_chunk_len"] == 16
    text = aot.format_report(aot.run(config, None, 1, hbm=budget, suggest=2), config)
    assert "DOES NOT FIT" in text and "fits with: --config.model.remat_policy=" in text
    text = aot.format_report(aot.run(config, None, 1, hbm=1024, suggest=1), config)
    assert "none of the first 1 settings tried fits" in text


def test_candidates_cover_fsdp_and_accumulation(tmp_path):
    config = small_config(str(tmp_path))
    cands = aot.candidates(config, 8)
    assert all(c["model.loss_chunk_len"] == 4 for c in cands)
    assert any(c.get("mesh.fsdp") == 8 for c in cands)
    assert [c["optimizer.grad_accum_steps"] for c in cands
            if "optimizer.grad_accum_steps" in c] == [2, 4, 8]
    for c in cands:  # every candidate is a valid config key set
        runconfig.config_with(config, **c)


@pytest.mark.slow
def test_compile_cli_on_simulated_devices(tmp_path):
    flags = overrides_to_flags({**SMALL_FLAGS, "data.cache_dir": str(tmp_path),
                                "mesh.fsdp": 2, "quant.bits": 4.0})
    proc = run_cli(["compile", "--devices=4", "--config=configs/tiny.py", *flags])
    out = proc.stdout
    assert "target: 4 CPU devices" in out and "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out
    assert "FP step" in out and "QAT step" in out and "QAT vs FP: HBM bytes" in out
    assert "all-gather x" in out  # fsdp gathers the weights
    proc = run_cli(["compile", "--devices=4", "--hbm=1KiB", "--suggest=0", *flags], check=False)
    assert proc.returncode == 3 and "DOES NOT FIT" in proc.stdout


def test_compile_needs_no_data_path():
    """The paper's configs read a prepared corpus (data.path) to train; compiling reads none."""
    proc = run_cli(["compile", "--devices=1", "--config=configs/paper.py:86m",
                    "--config.model.n_layers=1", "--config.model.seq_len=128",
                    "--config.data.batch_size=1", "--config.model.attention=xla"])
    assert "FP step: mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in proc.stdout


@pytest.mark.parametrize("args,match", [
    (["--devices=0"], "--devices=0 must be positive"),
    (["--devices=2", "--topology=v5p:2x2x1"], "not both"),
    (["--devices=3"], "data.batch_size=16 is not divisible by the 3 data-parallel"),
    (["--hbm=lots"], "--hbm=lots"),
])
def test_compile_bad_inputs(args, match):
    proc = run_cli(["compile", *args], check=False)
    assert proc.returncode in (1, 2) and match in proc.stderr, proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu installed")
def test_topology_without_libtpu_says_what_to_install():
    with pytest.raises(aot.CompileError, match=r"needs libtpu \(pip install -e \"\.\[tpu\]\"\)"):
        aot.target_devices("v5p:2x2x1", None)


def test_scanned_step_costs_count_every_layer(tmp_path):
    """XLA's cost analysis counts a scanned loop's body once; the report counts the layers
    (from 1- and 2-layer compiles) and matches the unrolled step's own count."""
    config = small_config(str(tmp_path), **{"model.n_layers": 4})
    devices = jax.devices()[:1]
    unrolled = aot.compile_step(config, devices)
    scanned = aot.compile_step(runconfig.config_with(config, **{"model.scan_layers": True}),
                               devices)
    assert scanned["costs_from"].startswith("1- and 2-layer compiles")
    assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.01)
    assert scanned["hbm_bytes"] == pytest.approx(unrolled["hbm_bytes"], rel=0.1)


def _xla_flops(config) -> float:
    """XLA's own FLOPs count of the FP train step on one device (a loop's body counted once)."""
    mesh = sharding.make_mesh(resolve.mesh_spec(config), jax.devices()[:1])
    setup = trainstep.Setup.create(resolve.planned(config), mesh)
    tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.model.seq_len + 1), np.int32,
                                  sharding=sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh), sharding.axis_rules():
        compiled = setup.fp.step.lower(setup.abstract_state, tokens).compile()
    return aot._cost(compiled)["flops"]


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_chunked_loss_costs_count_every_chunk(tmp_path, cpu_kernels):
    """The chunked cross-entropy is a loop too: the report counts all of its chunks (the
    unchunked step, plus the recomputed head in XLA's forms, as accelerators run it; the CPU
    kernels' cross-entropy recomputes nothing), which agrees with extrapolating XLA's own
    counts at chunks of 8 and 4 positions: total = F(8) + 2 (k - 1) (F(8) - F(4)), k = 32 / 8."""
    config = small_config(str(tmp_path), **{"model.loss_chunk_len": 8,
                                            "model.cpu_kernels": cpu_kernels})
    reported = aot.compile_step(config, jax.devices()[:1])
    assert reported["costs_from"].startswith("the unchunked step")
    assert ("recomputed" in reported["costs_from"]) == (not cpu_kernels)
    f8 = _xla_flops(config)
    f4 = _xla_flops(runconfig.config_with(config, **{"model.loss_chunk_len": 4}))
    assert f8 < 0.9 * reported["flops"]  # XLA alone misses most of the head's work
    assert reported["flops"] == pytest.approx(f8 + 2 * 3 * (f8 - f4), rel=0.02)


def test_out_of_memory_compile_is_reported(tmp_path):
    """The TPU compiler refuses a step that does not fit; its message is the memory figure."""
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (148.11G) exceeds available HBM (95.74G).")
    assert aot._needed_bytes(msg) == pytest.approx(148.11 * 2**30)
    config = small_config(str(tmp_path))
    state = 3 * 2**30
    step = {"phase": "fp", "mesh": {"data": 1}, "attention": "splash", "dtype": "bfloat16",
            "platform": "tpu", "error": msg, "compile_s": 1.0, "flops": None,
            "hbm_bytes": None, "collectives": None, "fits": False,
            "memory": {"arguments": state, "outputs": state, "aliased": state,
                       "temporaries": 148.11 * 2**30, "code": 0, "total": 151.11 * 2**30}}
    step["roofline"] = aot.roofline(step, config, 4, chips.CHIPS["TPU v5p"])
    report = {"target": "v5p:2x2x1", "device_kind": "TPU v5", "n_devices": 4,
              "hbm": 95 * 2**30, "steps": [step], "suggestion": None}
    text = aot.format_report(report, config)
    assert "DOES NOT FIT: XLA needs 148.11 GiB of temporaries beside the 3.00 GiB state" in text


def test_uncountable_costs_are_reported_as_such(tmp_path, monkeypatch):
    """When a helper compile (here: the unchunked loss) does not fit, the step's FLOPs and
    bytes are 'not counted', never XLA's partial count, and the report says why."""
    config = small_config(str(tmp_path), **{"model.loss_chunk_len": 8})
    compiled = {"phase": "fp", "mesh": {"data": 1}, "attention": "xla", "dtype": "float32",
                "platform": "cpu", "error": None, "compile_s": 1.0, "flops": 1e9,
                "hbm_bytes": 1e8, "collectives": {}, "loop_collectives": {}}
    oom = {**compiled, "error": "RESOURCE_EXHAUSTED", "flops": None}
    monkeypatch.setattr(aot, "compile_step", lambda *a, **k: oom)
    costs = aot._chunk_costs(config, jax.devices()[:1], False, compiled)
    assert costs["flops"] is None and costs["hbm_bytes"] is None
    step = {**costs, "fits": True, "memory": {"arguments": 1, "outputs": 1, "aliased": 1,
                                                "temporaries": 1, "code": 0, "total": 2}}
    step["roofline"] = aot.roofline(step, config, 1, None)
    text = aot.format_report({"target": "1 CPU devices", "device_kind": "cpu", "n_devices": 1,
                              "hbm": None, "steps": [step]}, config)
    assert "FLOPs and bytes not counted: the unchunked step does not fit" in text
    assert "x 6ND" not in text


def test_splash_flops_formula(tmp_path):
    """Splash's FLOPs are counted by formula (XLA sees a custom call): the causal blocks at and
    below the diagonal, forward and backward, and the remat forward again."""
    config = small_config(str(tmp_path), **{"model.seq_len": 512, "model.attention_block": 128,
                                            "data.batch_size": 8})
    m = config.model
    full = 4 * 512 * 512 * m.d_model * m.n_layers * 8  # forward, no mask
    assert aot.splash_flops(config, 2) == pytest.approx(full * (10 / 16) * 3 / 2)
    remat = runconfig.config_with(config, **{"model.remat_policy": "full"})
    assert aot.splash_flops(remat, 2) == pytest.approx(full * (10 / 16) * 4 / 2)


def test_collective_matmul_loops_are_told_from_scans():
    """On large fsdp meshes the TPU compiler turns sharded matmuls into loops (whose bodies its
    cost analysis counts once): those are recognised by their op_name, scans are not."""
    ours = ('  %while.3 = (f32[]) while(%t), condition=%c, body=%b, '
            'metadata={op_name="jit(train_step)/jvp(Decoder)/while"}')
    xlas = ('  %while.15 = (bf16[8,1024]) while(%t), condition=%c2, body=%b2, '
            'metadata={op_name="jit(train_step)/transpose(jvp(Decoder))/block_0/attn/k/'
            'dot_general"}')
    assert not hlo.collective_matmul_loops(ours)
    assert hlo.collective_matmul_loops(ours + "\n" + xlas)
