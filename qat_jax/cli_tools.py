"""`qat-jax prepare`, `qat-jax bench` and `qat-jax compile`: their flags and what they run (the
command line: qat_jax/cli.py)."""

from __future__ import annotations

import os

from absl import flags

from qat_jax.errors import UsageError


def prepare_flags(fv: flags.FlagValues):
    flags.DEFINE_string("input", None, "glob of .jsonl (one document per line) or text files",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "output directory (must not exist or be empty)",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "sentencepiece .model file; empty: train a BPE "
                        "tokenizer of --vocab_size pieces on the train split", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 32000, "pieces of the trained tokenizer",
                         flag_values=fv)
    flags.DEFINE_string("text_key", "text", "field of a jsonl line holding the text",
                        flag_values=fv)
    flags.DEFINE_integer("val_every_nth_doc", 50, "every n-th document goes to validation",
                         flag_values=fv)
    flags.DEFINE_integer("record_tokens", 1 << 16, "tokens per ArrayRecord record",
                         flag_values=fv)
    flags.DEFINE_integer("shard_records", 256, "records per shard file", flag_values=fv)


def cmd_prepare(fv) -> int:
    from qat_jax.tools import prepare

    if not fv.input or not fv.out:
        raise UsageError("--input and --out are required")
    meta = prepare.prepare(fv.input, fv.out, tokenizer=fv.tokenizer, vocab_size=fv.vocab_size,
                           text_key=fv.text_key, val_every_nth_doc=fv.val_every_nth_doc,
                           record_tokens=fv.record_tokens, shard_records=fv.shard_records)
    splits = ", ".join(f"{k} {v['tokens']:,} tokens in {len(v['shards'])} shards"
                       for k, v in meta["splits"].items())
    print(f"wrote {fv.out}: {splits}; train with --config.data.source=array_record "
          f"--config.data.path={fv.out} --config.model.vocab_size={meta['vocab_size']}")
    return 0


def bench_flags(fv: flags.FlagValues):
    flags.DEFINE_integer("steps", 10, "timed steps (after one compile step)", flag_values=fv)
    flags.DEFINE_integer("ops", 0, "also list the N ops that take the most time (a profile "
                         "of 3 steps)", flag_values=fv)
    flags.DEFINE_list("qat_bits", [], "also time QAT at these bit widths (e.g. 1,2,4) and "
                      "report QAT / FP step time, measured in this process", flag_values=fv)


def cmd_bench(fv) -> int:
    from qat_jax import quant
    from qat_jax.tools import bench

    if fv.steps <= 0:
        raise UsageError(f"--steps={fv.steps}: the timed steps must be at least 1")
    try:
        bits = [quant.quantizer(float(b)).bits for b in fv.qat_bits]
    except ValueError as e:
        raise UsageError(f"--qat_bits: {e}") from None
    if fv.ops < 0:
        raise UsageError(f"--ops={fv.ops}: the number of ops to list must be >= 0")
    if fv.ops and bench.TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {bench.TRACE_FLAG}"
    report = bench.bench(fv.config, fv.steps)
    print(bench.format_report(report))
    if fv.ops:
        print(bench.format_ops(bench.op_profile(fv.config, top=fv.ops)))
    if bits:
        print(bench.format_overhead(bench.qat_overhead(fv.config, bits, fv.steps)))
    return 0


def compile_flags(fv: flags.FlagValues):
    flags.DEFINE_string("topology", "", "a TPU topology, e.g. v5p:4x4x2 (needs libtpu: "
                        "pip install -e \".[tpu]\")", flag_values=fv)
    flags.DEFINE_integer("devices", None, "compile for this many CPU devices instead",
                         flag_values=fv)
    flags.DEFINE_string("hbm", "", "memory per device, e.g. 16GiB (default: the chip's)",
                        flag_values=fv)
    flags.DEFINE_integer("suggest", 6, "when it does not fit, compile up to this many "
                         "other settings for one that does (0: none)", flag_values=fv)


def cmd_compile(fv) -> int:
    import jax

    from qat_jax.law import planner
    from qat_jax.tools import aot

    if fv.topology and fv.devices:
        raise UsageError("give --topology (TPU) or --devices (CPU), not both")
    if fv.devices is not None and fv.devices <= 0:
        raise UsageError(f"--devices={fv.devices} must be positive")
    if fv.devices:  # simulated CPU devices, before the backend starts
        jax.config.update("jax_num_cpu_devices", fv.devices)
    if fv.topology:  # the host's own arrays (keys, shapes) stay on CPU; the TPU is abstract
        jax.config.update("jax_platforms", "cpu")
    try:
        hbm = planner.parse_bytes(fv.hbm) if fv.hbm else None
    except ValueError as e:
        raise UsageError(f"--hbm={fv.hbm}: {e}") from None
    report = aot.run(fv.config, fv.topology, fv.devices, hbm, fv.suggest)
    print(aot.format_report(report, fv.config))
    return 0 if all(s["fits"] is not False for s in report["steps"]) else 3
