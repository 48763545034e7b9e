"""What the optimized HLO text of a compiled step says of its communication: every collective
with its count and bytes, those repeated inside loops (a scan's body), and whether XLA split a
sharded matmul into a loop of its own (`qat-jax compile`, tools/aot.py, reads them)."""

from __future__ import annotations

import re

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_OP = re.compile(r"=\s+(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{op: {'count', 'bytes'}} over the optimized HLO; an async op (-start) counts once, its
    bytes those of its largest result (the gathered or reduced buffer)."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        sizes = [_DTYPE_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
                 for dt, dims in _SHAPE.findall(m.group(1))]
        out[m.group(2)]["count"] += 1
        out[m.group(2)]["bytes"] += max(sizes, default=0)
    return out


# TPU compiler options that keep XLA from splitting a sharded matmul into a loop over its
# shards (a "windowed einsum" or collective matmul, which it does on large fsdp meshes).
NO_COLLECTIVE_MATMUL = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                        "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def collective_matmul_loops(hlo_text: str) -> bool:
    """Whether XLA made loops of its own, over a matmul's shards (their op_name is the
    dot_general's; the loops of our scans are named after the while primitive)."""
    return any(re.search(r'op_name="[^"]*dot_general"', line)
               for line in hlo_text.splitlines() if " while(" in line)


def loop_collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """collectives() of the computations run inside while loops (a scan's body, and what it
    calls): the communication repeated at every iteration, counted once per iteration."""
    comps, header = {}, re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
    name = None
    for line in hlo_text.splitlines():
        m = header.match(line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    calls = lambda lines: {c for ln in lines for c in _CALLED.findall(ln)}
    todo = [b for lines in comps.values() for ln in lines for b in _BODY.findall(ln)]
    seen = set()
    while todo:
        c = todo.pop()
        if c in comps and c not in seen:
            seen.add(c)
            todo.extend(calls(comps[c]))
    return collectives("\n".join(ln for c in seen for ln in comps[c]))


_BODY = re.compile(r"\bbody=%([\w.\-]+)")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|"
                     r"called_computations)=\{?%([\w.\-]+)")
