"""The float32 step on CPU in XLA's own forms (`model.cpu_kernels=false`) against
qat_jax/kernels.py's forms with float32 operands (the default), FP and 4-bit QAT: both built in
one process and timed in alternating rounds (the best of ROUNDS rounds of STEPS steps each), so
that a noisy machine's slow moments fall on both alike. docs/performance.md's table comes from
it. Run it on an idle machine.

    python benchmarks/cpu_forms.py --seq_len=256 --batch_size=8
    python benchmarks/cpu_forms.py --seq_len=128 --batch_size=16     # the tiny config's shape
"""

from __future__ import annotations

import argparse

import jax

from qat_jax import resolve, runconfig, sharding, trainstep
from qat_jax.configs import tiny
from qat_jax.tools import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    config = runconfig.config_with(tiny.get_config(), **{
        "model.seq_len": a.seq_len, "data.batch_size": a.batch_size,
        "model.matmul_precision": "float32"})
    mesh = sharding.make_mesh(resolve.mesh_spec(config))
    setups = {}
    for kernels in (False, True):
        for bits in (None, 4.0):
            c = runconfig.config_with(config, **{"model.cpu_kernels": kernels,
                                                 "quant.bits": bits})
            setups[kernels, bits] = trainstep.Setup.create(resolve.resolve(c), mesh)
    best = dict.fromkeys(setups, float("inf"))
    with jax.set_mesh(mesh), sharding.axis_rules():
        tokens = bench._tokens(config, mesh)
        for _ in range(a.rounds):
            for key, setup in setups.items():
                best[key] = min(best[key], bench._step_time(setup, tokens, a.steps)[1])
    tokens_per_step = a.seq_len * a.batch_size
    print(f"sequence {a.seq_len}, batch {a.batch_size}: tokens/s, best of {a.rounds} x "
          f"{a.steps} steps")
    for bits in (None, 4.0):
        xla, ours = (tokens_per_step / best[k, bits] for k in (False, True))
        print(f"{'FP' if bits is None else '4-bit':>6}  XLA's forms {xla:,.0f}  kernels' forms "
              f"{ours:,.0f}  ratio {ours / xla:.2f}")


if __name__ == "__main__":
    main()
