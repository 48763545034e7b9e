"""`qat-jax bench`: step time, tokens/s, achieved FLOP/s and MFU against this machine's own
dense-matmul rate measured in the same process and dtype, with where the step's time goes
(forward, backward, optimizer update); with --qat_bits, the QAT / FP step-time ratios."""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from qat_jax import kernels, resolve, runconfig, sharding, sizes, trainstep


def _time(fn, *args, repeats: int) -> float:
    """Best-of wall time of fn(*args) (compiled beforehand by one call)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops_per_s(dtype, sizes=(1024, 2048), repeats: int = 5) -> float:
    """Peak dense-matmul FLOP/s this process reaches on all local devices (square matmuls of
    `dtype` operands, float32 products)."""
    best = 0.0
    n_dev = jax.local_device_count()
    # one [n, n] matmul per local device: the batch axis split over them
    mesh = jax.make_mesh((n_dev,), ("d",), devices=jax.local_devices(),
                         axis_types=(jax.sharding.AxisType.Auto,))
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    for n in sizes:
        a = jax.device_put(jnp.ones((n_dev, n, n), dtype),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
        dt = _time(f, a, repeats=repeats)
        best = max(best, n_dev * 2 * n**3 / dt)
    return best


def _tokens(config, mesh):
    rng = np.random.default_rng(0)
    host_batch = config.data.batch_size // jax.process_count()
    tokens = rng.integers(0, config.model.vocab_size, (host_batch, config.model.seq_len + 1),
                          dtype=np.int32)
    return sharding.shard_batch(tokens, mesh)


def _step_time(setup, tokens, steps: int) -> tuple[float, float, object]:
    """(compile seconds, seconds per step, final state) of `steps` train steps of the run's
    served model: the QAT step (after the switch) when the config quantizes."""
    state = setup.served.enter(setup.init(jax.random.key(0)))  # QAT: switched at step 0
    step_fn = setup.served.step
    t = time.perf_counter()
    state, m = step_fn(state, tokens)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step_fn(state, tokens)
    jax.block_until_ready(m)
    return compile_s, (time.perf_counter() - t) / steps, state


def _time_split(setup, state, tokens, rounds: int = 5) -> dict:
    """Where a step's time goes: the best seconds of a whole train step, of the forward pass
    alone and of forward + backward, timed in turn in `rounds` rounds so that a loaded
    machine's slow moments fall on all three alike (timed apart, their shares did not add up)."""
    fns = {"forward": jax.jit(functools.partial(trainstep.loss_fn, net=setup.net)),
           "forward_backward": jax.jit(jax.value_and_grad(
               functools.partial(trainstep.loss_fn, net=setup.net)))}
    for fn in fns.values():  # compiled before the clock starts
        jax.block_until_ready(fn(state.params, tokens))
    best = {"step": float("inf"), **dict.fromkeys(fns, float("inf"))}
    for _ in range(rounds):
        t = time.perf_counter()
        state, m = setup.served.step(state, tokens)
        jax.block_until_ready(m)
        best["step"] = min(best["step"], time.perf_counter() - t)
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(state.params, tokens))
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def time_split_text(r: dict) -> str:
    """The report's time split: shares of the step that add up to 100%. Where forward +
    backward alone take longer than the whole step (the step's own fusion, or noise), the
    two are shares of that time and the update is within the noise."""
    step, fwd, bwd = r["split_step_s"], r["forward_s"], r["backward_s"]
    if fwd + bwd <= step:
        pct = [round(100 * x / step) for x in (fwd, bwd)]
        return (f"forward {pct[0]}%, backward {pct[1]}%, optimizer update + rest "
                f"{100 - sum(pct)}% (best of interleaved rounds)")
    f = round(100 * fwd / (fwd + bwd))
    return (f"forward {f}%, backward {100 - f}%, optimizer update + rest ~0% (forward + "
            f"backward timed alone: {100 * (fwd + bwd) / step:.0f}% of the step; the rest is "
            f"within that noise)")


def qat_overhead(config, bits_list, steps: int, rounds: int = 5) -> dict:
    """QAT step time / FP step time for each bit width, for the same config in this process.
    FP and QAT steps alternate in `rounds` rounds and the best time of each is kept, so a slow
    moment of a noisy machine does not land on one side only."""
    mesh = sharding.make_mesh(resolve.mesh_spec(config))
    setups = {}
    for bits in [None, *bits_list]:
        c = runconfig.config_with(config, **{"quant.bits": bits})
        setups[bits] = trainstep.Setup.create(resolve.resolve(c), mesh)
    best = dict.fromkeys(setups, float("inf"))
    with jax.set_mesh(mesh), sharding.axis_rules():
        tokens = _tokens(config, mesh)
        for _ in range(rounds):
            for bits, setup in setups.items():
                best[bits] = min(best[bits], _step_time(setup, tokens, steps)[1])
    return {"fp_step_s": best[None],
            "qat": {b: {"step_s": best[b], "ratio": best[b] / best[None]} for b in bits_list}}


def bench(config, steps: int) -> dict:
    run = resolve.resolve(config)
    mesh = sharding.make_mesh(run.mesh)
    setup = trainstep.Setup.create(run, mesh)
    p = setup.plan
    with jax.set_mesh(mesh), sharding.axis_rules():
        tokens = _tokens(config, mesh)
        compile_s, step_s, state = _step_time(setup, tokens, steps)
        split = _time_split(setup, state, tokens)
    dtype = setup.net.cfg.dtype
    operands = jnp.bfloat16 if setup.net.cfg.bf16_matmuls else dtype
    peak = matmul_flops_per_s(operands)
    tokens_per_s = p.tokens_per_step / step_s
    flops_per_token = sizes.flops_per_token(run.model)
    achieved = tokens_per_s * flops_per_token
    return {
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "dtype": jnp.dtype(dtype).name, "matmul_dtype": jnp.dtype(operands).name,
        "params": sizes.param_count(run.model, run.quant)["total"],
        "tokens_per_step": p.tokens_per_step, "compile_s": compile_s, "step_s": step_s,
        "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
        "achieved_flops_per_s": achieved, "matmul_flops_per_s": peak, "mfu": achieved / peak,
        "split_step_s": split["step"], "forward_s": split["forward"],
        "backward_s": split["forward_backward"] - split["forward"],
        "update_s": split["step"] - split["forward_backward"],
        "cpu_bf16_dot": jax.default_backend() == "cpu" and kernels.cpu_has_bf16_dot(),
    }


# XLA's CPU runtime marks each op's execution in a profile only with this flag, which must be
# in XLA_FLAGS before the backend starts (`qat-jax bench --ops` sets it).
TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"


def op_profile(config, steps: int = 3, top: int = 20) -> list[dict]:
    """Where the train step's time goes, op by op: `steps` steps under jax.profiler, each
    executed XLA op's time summed by the model code it comes from (its op_name, layers
    merged: block_N), largest first. On CPU this needs TRACE_FLAG in XLA_FLAGS."""
    mesh = sharding.make_mesh(resolve.mesh_spec(config))
    setup = trainstep.Setup.create(resolve.resolve(config), mesh)
    step_fn = setup.served.step
    with jax.set_mesh(mesh), sharding.axis_rules(), tempfile.TemporaryDirectory() as out:
        tokens = _tokens(config, mesh)
        state = setup.served.enter(setup.init(jax.random.key(0)))
        compiled = step_fn.lower(state, tokens).compile()  # the executable traced below
        source = _op_sources(compiled.as_text())
        state, m = compiled(state, tokens)
        jax.block_until_ready(m)
        with jax.profiler.trace(out, create_perfetto_trace=True):
            for _ in range(steps):
                state, m = compiled(state, tokens)
            jax.block_until_ready(m)
        trace = sorted(glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True))
        events = json.load(gzip.open(trace[-1])) if trace else []
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in source:
            total[source[e["name"]]] += e["dur"] / 1e6 / steps
    step_s = sum(total.values())
    return [{"op": k, "s": v, "share": v / step_s if step_s else 0.0}
            for k, v in total.most_common(top)]


def _op_sources(hlo_text: str) -> dict[str, str]:
    """{instruction name: the model code it comes from} of a compiled step's HLO."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r'\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"', line)
        if m:
            name = re.sub(r"jit\(\w+\)/|jvp\(|transpose\(|\)|checkpoint/", "", m.group(2))
            out[m.group(1)] = re.sub(r"block_\d+", "block_N", name)
    return out


def format_ops(rows: list[dict]) -> str:
    lines = ["time by op (per step; the backward's ops carry their forward op's name):"]
    lines += [f"  {r['s'] * 1e3:8.1f} ms {100 * r['share']:5.1f}%  {r['op']}" for r in rows]
    return "\n".join(lines)


def format_overhead(r: dict) -> str:
    lines = [f"FP step          {r['fp_step_s'] * 1e3:.1f} ms"]
    lines += [f"QAT {b:>4g}-bit     {v['step_s'] * 1e3:.1f} ms  ratio {v['ratio']:.3f}"
              for b, v in r["qat"].items()]
    return "\n".join(lines)


def format_report(r: dict) -> str:
    step = r["step_s"]
    hint = []
    if r["cpu_bf16_dot"] and r["matmul_dtype"] == "float32":
        hint = ["this CPU has bfloat16 dot instructions: --config.model.matmul_precision=bfloat16 "
                "runs about 1.5x faster (it changes numerics; docs/performance.md)"]
    return "\n".join([
        f"backend {r['backend']} x{r['devices']}, compute dtype {r['dtype']}, matmul operands "
        f"{r['matmul_dtype']}, "
        f"{r['params']:,} parameters, {r['tokens_per_step']:,} tokens/step",
        f"compile          {r['compile_s']:.2f} s",
        f"step time        {step * 1e3:.1f} ms",
        f"tokens/s         {r['tokens_per_s']:,.0f}",
        f"achieved         {r['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s "
        f"({r['flops_per_token'] / 1e6:.1f} MFLOP/token)",
        f"matmul peak      {r['matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s "
        f"(measured here, same operand dtype)",
        f"MFU              {100 * r['mfu']:.1f}%",
        f"time split       {time_split_text(r)}",
    ] + hint)
