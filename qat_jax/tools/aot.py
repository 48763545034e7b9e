"""`qat-jax compile`: the real train step compiled ahead of time for a target it need not run
on (a TPU topology from a CPU host, or N simulated CPU devices), and what XLA says of it.

The step is the one `qat-jax train` runs (trainstep.Setup, the config's mesh, FP and, when the
config quantizes, the QAT step), lowered against abstract arrays with their shardings and
compiled for the target's devices. From the compiled executable:
- per-device memory: arguments, outputs, temporaries, aliased (donated) bytes, and the total
  against the chip's HBM, with whether it fits;
- FLOPs (XLA's cost analysis, per device) against 6 N D of the step per device, and the HBM
  bytes the step reads and writes;
- every collective of the optimized HLO (all-gather, all-reduce, reduce-scatter, all-to-all,
  collective-permute) with its count and bytes (its result's, per device);
- a roofline step time, max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes / ICI
  bandwidth) (perfect overlap: a lower bound), and the MFU bound 6 N D / peak / that time.
When the step does not fit, the settings that would are searched (remat policies, the chunked
cross-entropy, fsdp over every device, gradient accumulation), one compile each.

Chip figures are the vendors' nominal ones (tools/chips.py); `--hbm` overrides the memory (and
is how the tests exercise the search on CPU, which has no HBM figure).
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import numpy as np

from qat_jax import resolve, runconfig, sharding, sizes, trainstep
from qat_jax.errors import UserError
from qat_jax.tools import chips, hlo


class CompileError(UserError, ValueError):
    """A target or setting `qat-jax compile` cannot use, with what would do."""


def target_devices(topology: str | None, n_devices: int | None) -> list:
    """The devices to compile for: an abstract TPU topology ('v5p:4x4x2'; needs libtpu) or the
    first `n_devices` CPU devices of this process (jax_num_cpu_devices, set before use)."""
    if topology:
        try:
            from jax.experimental import topologies

            return list(topologies.get_topology_desc(topology_name=topology,
                                                     platform="tpu").devices)
        except Exception as e:  # libtpu missing, or a name it does not know
            raise CompileError(
                f"--topology={topology}: no TPU topology ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). It needs libtpu (pip install -e \".[tpu]\") "
                f"and a name such as v5p:2x2x1, v5p:4x4x2, v5e:4x4, v4:2x2x1") from None
    devices = jax.devices("cpu")
    n = n_devices or len(devices)
    if n > len(devices):
        raise CompileError(f"--devices={n}: this process has {len(devices)} CPU devices; set "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return devices[:n]


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"flops": float(cost.get("flops", 0.0)),
            "hbm_bytes": float(cost.get("bytes accessed", 0.0))}


def compile_step(config, devices, qat: bool = False, kernels: bool = True) -> dict:
    """Compile the FP (or QAT) train step of `config` for `devices`; XLA's figures of it. A
    step XLA cannot fit in the device's memory comes back with `error` and the memory XLA said
    it needs (its FLOPs unknown). `kernels`: add the FLOPs of Pallas kernels, which XLA does
    not see (off in the helper compiles below, whose figures are only parts of a sum)."""
    run = resolve.planned(config)  # checked by the caller
    mesh = sharding.make_mesh(run.mesh, devices)
    setup = trainstep.Setup.create(run, mesh)
    step = setup.served.step if qat else setup.fp.step
    tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.model.seq_len + 1),
                                  np.int32, sharding=sharding.batch_sharding(mesh))
    out = {"phase": "qat" if qat else "fp", "mesh": dict(mesh.shape),
           "attention": setup.net.cfg.attention, "dtype": np.dtype(setup.net.cfg.dtype).name,
           "platform": setup.net.cfg.platform, "kernel_operands": setup.net.cfg.kernel_operands,
           "error": None}
    t = time.perf_counter()
    with jax.set_mesh(mesh), sharding.axis_rules():
        try:
            compiled = step.lower(setup.abstract_state, tokens).compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what does not fit
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            state = _state_bytes(setup.abstract_state)
            need = _needed_bytes(str(e))
            return {**out, "compile_s": time.perf_counter() - t, "flops": None,
                    "hbm_bytes": None, "collectives": None, "loop_collectives": None,
                    "error": str(e).splitlines()[0],
                    "memory": {"arguments": state, "outputs": state, "aliased": state,
                               "temporaries": need, "code": 0, "total": state + need}}
    out["compile_s"] = time.perf_counter() - t
    mem = compiled.memory_analysis()
    memory = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
              "temporaries": mem.temp_size_in_bytes, "aliased": mem.alias_size_in_bytes,
              "code": mem.generated_code_size_in_bytes}
    # Donated state: outputs alias arguments, so they are not counted twice.
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] +
                       memory["temporaries"])
    text = compiled.as_text()
    if out["platform"] == "tpu" and hlo.collective_matmul_loops(text):
        # XLA's count sees these loops' bodies once: the costs come from the same step
        # compiled without them (the memory stays the real program's)
        with jax.set_mesh(mesh), sharding.axis_rules():
            compiled = step.lower(setup.abstract_state, tokens).compile(
                compiler_options=hlo.NO_COLLECTIVE_MATMUL)
        text = compiled.as_text()
    costs = {**_cost(compiled), "collectives": hlo.collectives(text),
             "loop_collectives": hlo.loop_collectives(text)}
    accum, m = config.optimizer.grad_accum_steps, config.model
    if 0 < m.loss_chunk_len < m.seq_len:  # XLA counts a loop's body once: see _chunk_costs
        costs = _chunk_costs(config, devices, qat, costs)
    elif accum > 1:  # the same for the micro-steps
        costs = _accum_costs(config, devices, qat, costs)
    elif config.model.scan_layers:  # the same for the layers
        costs = _per_layer_costs(config, devices, qat, costs)
    if kernels and out["attention"] == "splash" and costs["flops"] is not None:
        # a Pallas kernel, opaque to XLA's count
        costs["attention_flops"] = splash_flops(config, len(devices))
        costs["flops"] += costs["attention_flops"]
    return {**out, "memory": memory, **costs}


def splash_flops(config, n_devices: int) -> float:
    """Attention's FLOPs per device in the splash kernel, which XLA's cost analysis does not
    see: q k^T and p v, 2 x 2 L^2 E per head forward, twice that backward, over the causal
    half (blocks above the diagonal are skipped; the diagonal blocks are whole), plus one more
    forward when a remat policy recomputes the block."""
    m = config.model
    L, block = m.seq_len, min(m.attention_block, m.seq_len)
    n_blocks = L // block
    causal = (n_blocks * (n_blocks + 1) / 2) / n_blocks**2
    forward = 4 * L * L * m.d_model * causal * m.n_layers * config.data.batch_size
    passes = 3 + (m.remat_policy != "none")
    return forward * passes / n_devices


def _per_layer_costs(config, devices, qat: bool, compiled: dict) -> dict:
    """FLOPs, HBM bytes and collectives of the n-layer step from the same step unrolled at 1
    and 2 layers: cost(n) = cost(1) + (n - 1) (cost(2) - cost(1)), exact for a stack of equal
    blocks (the optimizer's work is per parameter, so per layer too)."""
    one, two = (compile_step(runconfig.config_with(config, **{"model.n_layers": n,
                                                              "model.scan_layers": False}),
                             devices, qat, kernels=False) for n in (1, 2))
    if not _counted(one, two):
        return _unknown(compiled, "a 1- or 2-layer step does not fit")
    k = config.model.n_layers - 1
    return {**_extrapolate(one, two, k),
            "collectives": {op: {key: one["collectives"][op][key] + k * (
                two["collectives"][op][key] - one["collectives"][op][key])
                                 for key in ("count", "bytes")} for op in hlo.COLLECTIVES},
            "loop_collectives": two["loop_collectives"],
            "costs_from": "1- and 2-layer compiles (XLA counts a scanned loop's body once)"}


def _chunk_costs(config, devices, qat: bool, compiled: dict) -> dict:
    """FLOPs, HBM bytes and collectives of a step whose cross-entropy runs in chunks (a loop
    whose body XLA counts once): those of the same step with the loss in one piece (itself
    counted in full), plus the head's forward that the chunks' backward recomputes,
    2 V D FLOPs a token (none on CPU's kernel path, whose cross-entropy computes its gradients
    in the forward pass, chunked or not). Its HBM bytes stand for the chunked step's (the same
    logits are written and read, a chunk at a time). The memory stays the chunked step's own."""
    m = config.model
    whole = compile_step(runconfig.config_with(config, **{"model.loss_chunk_len": 0}),
                         devices, qat, kernels=False)
    if not _counted(whole):
        return _unknown(compiled, "the unchunked step does not fit")
    recompute = (0.0 if whole["kernel_operands"] else
                 2.0 * m.vocab_size * m.d_model * config.data.batch_size * m.seq_len)
    return {**{k: whole[k] for k in ("hbm_bytes", "collectives", "loop_collectives")},
            "flops": whole["flops"] + recompute / len(devices),
            "costs_from": "the unchunked step"
                          + ("" if whole["kernel_operands"] else " + the head's recomputed forward")
                          + (f"; {whole['costs_from']}" if whole.get("costs_from") else "")}


def _accum_costs(config, devices, qat: bool, compiled: dict) -> dict:
    """FLOPs and HBM bytes of a step with gradient accumulation, from the step without it on
    one and two rows per device (x and 2x rows, small enough to fit): the work is linear in
    the batch, cost(B) = cost(x) + (B - x) (cost(2x) - cost(x)) / x, the gradient and
    optimizer work being the same for any batch. Collectives are the compiled step's, with
    those inside its loop (`loop_collectives`) counted once per micro-step."""
    accum, batch = config.optimizer.grad_accum_steps, config.data.batch_size
    mesh = sharding.mesh_shape(resolve.mesh_spec(config), len(devices))
    x = mesh["data"] * mesh["fsdp"]  # one row per device
    one, two = (compile_step(runconfig.config_with(config, **{
        "optimizer.grad_accum_steps": 1, "data.batch_size": k * x}), devices, qat,
        kernels=False) for k in (1, 2))
    if not _counted(one, two):
        return _unknown(compiled, "a one-row step does not fit")
    loop = compiled["loop_collectives"]
    return {**_extrapolate(one, two, (batch - x) / x),
            "collectives": {op: {key: v[key] + (accum - 1) * loop[op][key]
                                 for key in ("count", "bytes")}
                            for op, v in compiled["collectives"].items()},
            "loop_collectives": loop,
            "costs_from": f"compiles of {x} and {2 * x} rows without accumulation (XLA counts "
                          f"the {accum} micro-steps' loop once)"}


def _extrapolate(one: dict, two: dict, k: float) -> dict:
    """FLOPs and HBM bytes on the line through two compiles: cost(one) + k (cost(two) -
    cost(one)), for a step made of equal parts (layers, rows) one more of which `two` has."""
    return {key: one[key] + k * (two[key] - one[key]) for key in ("flops", "hbm_bytes")}


def _counted(*steps) -> bool:
    return all(not s["error"] and s["flops"] is not None for s in steps)


def _unknown(compiled: dict, why: str) -> dict:
    """Costs that cannot be counted: FLOPs and bytes unknown (no roofline), said why."""
    return {**compiled, "flops": None, "hbm_bytes": None,
            "costs_from": f"not counted: {why}"}


def _state_bytes(abstract_state) -> int:
    """Bytes of the train state on one device, from its shardings."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(abstract_state))


def _needed_bytes(message: str) -> float:
    """The temporaries XLA said it needs, from its out-of-memory message (e.g. '(148.11G)')."""
    m = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", message)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]


def roofline(step: dict, config, n_devices: int, chip: chips.Chip | None) -> dict:
    """6 N D of the step per device, FLOPs / 6ND, and with a chip the roofline time and MFU."""
    n_params = sizes.param_count(*sizes.specs(config))["total"]
    six_nd = 6 * n_params * config.data.batch_size * config.model.seq_len / n_devices
    if step["flops"] is None:  # did not compile: out of memory
        return {"six_nd": six_nd}
    out = {"six_nd": six_nd, "flops_over_6nd": step["flops"] / six_nd}
    if chip is not None:
        comm = sum(c["bytes"] for c in step["collectives"].values())
        times = {"compute": step["flops"] / chip.peak_flops,
                 "memory": step["hbm_bytes"] / chip.hbm_bw, "network": comm / chip.ici_bw}
        t = max(times.values())
        out.update({"times": times, "step_s": t, "bound": max(times, key=times.get),
                    "mfu_bound": six_nd / chip.peak_flops / t if t else 0.0})
    return out


# Settings tried, in order, when a step does not fit: each keeps less than the one before.
CANDIDATES = (
    {"model.remat_policy": "dots_no_batch"},
    {"model.remat_policy": "qkv_attn_mlp_out"},
    {"model.remat_policy": "attn_mlp_out"},
    {"model.remat_policy": "full"},
)


def candidates(config, n_devices: int) -> list[dict]:
    """Settings to try when `config` does not fit on `n_devices`: remat policies, each with the
    chunked cross-entropy, fsdp over every device, then gradient accumulation."""
    chunk = {"model.loss_chunk_len": max(1, config.model.seq_len // 8)}
    fsdp = {"mesh.data": 1, "mesh.fsdp": n_devices // config.mesh.tensor}
    out = [dict(c, **chunk) for c in CANDIDATES]
    if config.mesh.fsdp * config.mesh.tensor < n_devices:
        out += [dict(c, **chunk, **fsdp) for c in CANDIDATES]
    for accum in (2, 4, 8):
        out.append({"model.remat_policy": "full", **chunk, **fsdp,
                    "optimizer.grad_accum_steps": accum})
    return out


def search(config, devices, hbm: float, max_tries: int) -> dict | None:
    """The first candidate setting that fits in `hbm` bytes per device, with its figures; None
    when none of the first `max_tries` does (or is valid)."""
    for overrides in candidates(config, len(devices))[:max_tries]:
        c = runconfig.config_with(config, **overrides)
        try:
            resolve.resolve(c, n_devices=len(devices), n_processes=1, needs_data=False)
        except resolve.ConfigError:
            continue
        step = compile_step(c, devices)
        if not step["error"] and step["memory"]["total"] <= hbm:
            return {"overrides": overrides, "step": step}
    return None


def run(config, topology: str | None, n_devices: int | None, hbm: float | None,
        suggest: int) -> dict:
    """The report of `qat-jax compile` (see the module docstring)."""
    devices = target_devices(topology, n_devices)
    try:
        resolve.resolve(config, n_devices=len(devices), n_processes=1, needs_data=False)
    except resolve.ConfigError as e:
        raise CompileError(f"for {len(devices)} devices: {e}") from None
    kind = devices[0].device_kind
    chip = chips.CHIPS.get(kind)
    if hbm is None and chip is not None:
        hbm = chip.hbm_bytes
    steps = [compile_step(config, devices)]
    if config.quant.bits is not None:
        steps.append(compile_step(config, devices, qat=True))
    for s in steps:
        s["roofline"] = roofline(s, config, len(devices), chip)
        s["fits"] = False if s["error"] else None if hbm is None else (
            s["memory"]["total"] <= hbm)
    report = {"target": topology or f"{len(devices)} CPU devices", "device_kind": kind,
              "n_devices": len(devices), "hbm": hbm, "chip": None if chip is None else
              dataclasses.asdict(chip), "steps": steps, "suggestion": None}
    if hbm is not None and not all(s["fits"] for s in steps) and suggest > 0:
        report["suggestion"] = search(config, devices, hbm, suggest)
        report["suggest_tries"] = suggest
    return report


def _figure(x: float | None) -> str:
    return "not counted" if x is None else f"{x:.4g}"


def _gib(x: float) -> str:
    return f"{x / chips.GIB:.2f} GiB" if x >= chips.GIB / 2 else f"{x / 2**20:.1f} MiB"


def format_report(report: dict, config) -> str:
    lines = [f"target: {report['target']} ({report['n_devices']} x {report['device_kind']}); "
             f"HBM per device: {'unknown' if report['hbm'] is None else _gib(report['hbm'])}"]
    for s in report["steps"]:
        m, r = s["memory"], s["roofline"]
        fits = {None: "unknown", True: "fits", False: "DOES NOT FIT"}[s["fits"]]
        lines.append(
            f"\n{s['phase'].upper()} step: mesh {s['mesh']}, {s['dtype']}, attention "
            f"{s['attention']}, remat {config.model.remat_policy}, scan layers "
            f"{config.model.scan_layers}; compiled in {s['compile_s']:.1f} s")
        if s["error"]:
            lines.append(f"  DOES NOT FIT: XLA needs {_gib(m['temporaries'])} of temporaries "
                         f"beside the {_gib(m['arguments'])} state ({s['error'][:160]})")
            continue
        lines += [
            f"  memory per device: arguments {_gib(m['arguments'])}, outputs "
            f"{_gib(m['outputs'])} (aliased {_gib(m['aliased'])}), temporaries "
            f"{_gib(m['temporaries'])}; total {_gib(m['total'])}: {fits}"]
        if s["flops"] is None:
            lines.append(f"  FLOPs and bytes {s['costs_from']}")
            continue
        lines += [
            f"  FLOPs per device {s['flops']:.4g} = {r['flops_over_6nd']:.3f} x 6ND "
            f"({r['six_nd']:.4g}); HBM bytes accessed {s['hbm_bytes']:.4g}"
            + (f" (from {s['costs_from']})" if s.get("costs_from") else "")
            + (f"; splash attention's {s['attention_flops']:.3g} FLOPs counted by formula"
               if s.get("attention_flops") else "")]
        used = {k: v for k, v in s["collectives"].items() if v["count"]}
        lines.append("  collectives: " + ("none" if not used else ", ".join(
            f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in used.items())))
        if config.optimizer.grad_accum_steps > 1:
            loop = sum(v["bytes"] for v in s["loop_collectives"].values())
            lines.append(f"  of which repeated at each of the {config.optimizer.grad_accum_steps}"
                         f" micro-steps: {loop / 2**20:.1f} MiB (weights gathered and "
                         f"gradients reduced once per step)")
        if "step_s" in r:
            t = r["times"]
            lines.append(f"  roofline: {1e3 * r['step_s']:.2f} ms per step ({r['bound']}-bound; "
                         f"compute {1e3 * t['compute']:.2f}, memory {1e3 * t['memory']:.2f}, "
                         f"network {1e3 * t['network']:.2f} ms); MFU bound {r['mfu_bound']:.2f}")
        else:
            lines.append(f"  roofline: no figures for {report['device_kind']}")
    if len(report["steps"]) == 2 and _counted(*report["steps"]):
        fp, qat = report["steps"]
        n = lambda s: sum(c["count"] for c in s["collectives"].values())
        lines.append(f"\nQAT vs FP: HBM bytes {qat['hbm_bytes'] / fp['hbm_bytes'] - 1:+.1%}, "
                     f"collectives {n(qat)} vs {n(fp)}, memory "
                     f"{qat['memory']['total'] / fp['memory']['total'] - 1:+.1%}")
    if "suggest_tries" in report:
        sug = report["suggestion"]
        if sug is None:
            lines.append(f"\nnone of the first {report['suggest_tries']} settings tried fits; "
                         f"try more devices (mesh.fsdp), a smaller data.batch_size or model")
        else:
            flags = " ".join(f"--config.{k}={v}" for k, v in sug["overrides"].items())
            lines.append(f"\nfits with: {flags} (total {_gib(sug['step']['memory']['total'])}"
                         f", FLOPs {_figure(sug['step']['flops'])})")
    return "\n".join(lines)
