"""Why the bfloat16 step on CPU runs its matmuls below their stand-alone rate: the model's
matmul shapes timed alone (bfloat16 inputs; float32 inputs rounded inside the jit; float32),
one projection's forward and backward through qat_jax/kernels.py with the same inputs every
call and with a fresh input each call (out of L2), and the train step at several
`optimizer.grad_accum_steps` (micro-batches), in alternating rounds. docs/performance.md's
section "where the bfloat16 step loses its matmul rate" comes from it. Run it on an idle
machine.

    python benchmarks/cpu_matmul_cache.py --seq_len=256 --batch_size=8 --accum=1,4
"""

from __future__ import annotations

import argparse
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from qat_jax import kernels

D_MODEL, D_FF = 256, 704  # the issue-18 model's projection (d_model x d_ff)


def _best(f, args_list, reps: int = 10, rounds: int = 5) -> float:
    """Seconds per call, the best of `rounds` rounds of `reps` calls cycling over args_list."""
    jax.block_until_ready(f(*args_list[0]))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(reps):
            out = f(*args_list[i % len(args_list)])
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def matmuls(rows: int) -> list[tuple[str, float]]:
    """GFLOP/s of [1, M, K] x [1, K, N] for the projection's forward, input-gradient and
    weight-gradient shapes, in the three operand forms."""
    out = []
    for m, k, n in ((rows, D_MODEL, D_FF), (rows, D_FF, D_MODEL), (D_MODEL, rows, D_FF)):
        a32 = jnp.asarray(np.random.randn(1, m, k), jnp.float32)
        b32 = jnp.asarray(np.random.randn(1, k, n), jnp.float32)
        forms = {
            "bfloat16 inputs": (lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b,
                                                        preferred_element_type=jnp.float32),
                                (a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16))),
            "float32 inputs rounded in the jit": (lambda a, b: jnp.einsum(
                "bmk,bkn->bmn", a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                preferred_element_type=jnp.float32), (a32, b32)),
            "float32": (lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b), (a32, b32)),
        }
        for name, (f, args) in forms.items():
            s = _best(jax.jit(f), [args])
            out.append((f"{m}x{k} @ {k}x{n}, {name}", 2 * m * k * n / s / 1e9))
    return out


def projection(rows: int, batch: int) -> list[tuple[str, float]]:
    """GFLOP/s of one projection's forward and backward (kernels.dot_general, bfloat16
    operands): the same inputs every call (in cache), and a fresh one each call."""
    seq = rows // batch
    dn = (((2,), (0,)), ((), ()))
    step = jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(kernels.dot_general(x, w, dn) ** 2), argnums=(0, 1)))
    flops = 3 * 2 * rows * D_MODEL * D_FF
    fresh = [(jnp.asarray(np.random.randn(batch, seq, D_MODEL), jnp.float32),
              jnp.asarray(np.random.randn(D_MODEL, D_FF) * 0.05, jnp.float32))
             for _ in range(64)]
    return [("projection forward + backward, the same inputs",
             flops / _best(step, fresh[:1]) / 1e9),
            ("projection forward + backward, a fresh input each call",
             flops / _best(step, fresh, reps=64, rounds=3) / 1e9)]


def steps(seq_len: int, batch: int, accums: list[int], rounds: int) -> dict[int, list[float]]:
    """tokens/s of `qat-jax bench` (bfloat16 operands) at each grad_accum_steps, in
    alternating rounds (each bench its own process)."""
    out = {a: [] for a in accums}
    for _ in range(rounds):
        for a in accums:
            text = subprocess.run(
                ["qat-jax", "bench", f"--config.model.seq_len={seq_len}",
                 f"--config.data.batch_size={batch}", "--steps=5",
                 "--config.model.matmul_precision=bfloat16",
                 f"--config.optimizer.grad_accum_steps={a}"],
                capture_output=True, text=True, check=True).stdout
            line = next(x for x in text.splitlines() if x.startswith("tokens/s"))
            out[a].append(float(line.split()[-1].replace(",", "")))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--accum", default="1,4", help="grad_accum_steps to time the step at")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    rows = a.seq_len * a.batch_size
    print(f"CPU bf16 dot instructions: {kernels.cpu_has_bf16_dot()}; {rows} positions per step")
    for name, rate in matmuls(rows) + projection(rows, a.batch_size):
        print(f"{rate:8.0f} GFLOP/s  {name}")
    accums = [int(x) for x in a.accum.split(",") if x]
    if accums:
        for acc, rates in steps(a.seq_len, a.batch_size, accums, a.rounds).items():
            print(f"grad_accum_steps={acc}: tokens/s " + " / ".join(f"{r:,.0f}" for r in rates))


if __name__ == "__main__":
    main()
