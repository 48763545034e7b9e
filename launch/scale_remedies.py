"""Compare the quantizer scales' optimizers (qat.scale_update, scale_lr_mult, scale_warmup_frac)
by the served loss they give, at every bit width, against the full-precision run with the same
schedule (its cooldown as long as the QAT phase): the table of docs/SCALES.md.

    python launch/scale_remedies.py --workdir=/tmp/scales --size=xs
    python launch/scale_remedies.py --workdir=/tmp/scales --size=s --variants=fp,relative \
        --bits=8,6 --tokens=1000000

Runs `qat-jax train` once per (variant, bits), one after another, on the embedded Bible at a
1,024-piece vocabulary (the repro's model sizes); a rerun skips the runs that have a
result.json and resumes the others. Prints the table (markdown) and writes it to
WORKDIR/table.md, with every number read from the runs' result.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import shell, train_command  # noqa: E402

SIZES = {  # as qat_jax.repro.SIZES
    "xs": {"d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 176},
    "s": {"d_model": 128, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 352},
}
VARIANTS = {  # name -> qat.* overrides; "fp" is the full-precision reference
    "fp": {},
    "additive": {"scale_update": "additive"},
    "additive-lr0.1": {"scale_update": "additive", "scale_lr_mult": 0.1},
    "additive-lr0.01": {"scale_update": "additive", "scale_lr_mult": 0.01},
    "additive-warmup": {"scale_update": "additive", "scale_warmup_frac": 0.25},
    "relative": {"scale_update": "relative"},
    "relative-lr0.1": {"scale_update": "relative", "scale_lr_mult": 0.1},
    "relative-warmup": {"scale_update": "relative", "scale_warmup_frac": 0.25},
}
BITS = (8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.58, 1.0)


def overrides(size: str, variant: str, bits: float | None, args) -> list[str]:
    o = {f"model.{k}": v for k, v in SIZES[size].items()}
    o.update({"model.vocab_size": 1024, "data.batch_size": 16, "seed": args.seed,
              "schedule.total_tokens": args.tokens, "optimizer.peak_lr": args.lr,
              "logging.every_steps": 10, "logging.eval_every_steps": 10**9,
              "logging.tensorboard": False, "data.eval_batches": 16})
    if bits is None:  # the same schedule: its cooldown is as long as the QAT phase would be
        o["schedule.cooldown_frac"] = args.fraction
    else:
        o.update({"quant.bits": bits, "qat.fraction_policy": "fixed",
                  "qat.fraction": args.fraction})
        o.update({f"qat.{k}": v for k, v in VARIANTS[variant].items()})
    return [f"--config.{k}={v}" for k, v in o.items()]


def run_name(variant: str, bits: float | None) -> str:
    return variant if bits is None else f"{variant}-{bits:g}b"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--size", choices=sorted(SIZES), default="xs")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--bits", default=",".join(f"{b:g}" for b in BITS))
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="configs/tiny.py")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; valid: {list(VARIANTS)}")
    bits = [float(b) for b in args.bits.split(",")]
    root = Path(args.workdir)
    results = {}
    for variant in variants:
        for b in [None] if variant == "fp" else bits:
            workdir = root / args.size / run_name(variant, b)
            if not (workdir / "result.json").exists():
                argv_i = train_command(args.config, str(workdir), overrides(args.size, variant,
                                                                            b, args),
                                       python=sys.executable)
                print(shell(argv_i), flush=True)
                subprocess.run(argv_i, check=True, stdout=subprocess.DEVNULL)
            results[(variant, b)] = json.loads((workdir / "result.json").read_text())
    table = format_table(results, variants, bits, args)
    (root / args.size / "table.md").write_text(table)
    print(table)


def format_table(results, variants, bits, args) -> str:
    fp = results.get(("fp", None))
    head = (f"{args.size}, {args.tokens:,} tokens, QAT fraction {args.fraction}, peak LR "
            f"{args.lr:g}, seed {args.seed}")
    if fp:
        head += f"; full precision (same schedule): {fp['val_loss']:.4f}"
    lines = [head, "", "| bits | " + " | ".join(v for v in variants if v != "fp") + " |",
             "|---" * (1 + sum(v != "fp" for v in variants)) + "|"]
    for b in bits:
        cells = []
        for v in variants:
            if v == "fp":
                continue
            r = results[(v, b)]
            h = r["quant_health"]
            gap = f" (+{r['val_loss'] - fp['val_loss']:.3f})" if fp else ""
            cells.append(f"{r['val_loss']:.4f}{gap}, dead {h['dead_frac']:.1%}, clip "
                         f"{h['clip_frac']:.3f}")
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: served validation loss (nats; its gap to full precision), "
              "the fraction of scales at the floor and of weights clipped at the end."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
