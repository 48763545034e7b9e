"""The `qat-jax` command (also `python -m qat_jax`): parses flags, then calls the library.

    qat-jax train   [--config=configs/tiny.py] [--workdir=DIR] [--config.KEY=VALUE ...]
    qat-jax eval    --workdir=DIR
    qat-jax prepare --input=GLOB --out=DIR [--tokenizer=FILE.model | --vocab_size=N]
    qat-jax bench   [--config=...] [--steps=N] [--qat_bits=1,2,4] [--config.KEY=VALUE ...]
    qat-jax export  --workdir=DIR --out=FILE.safetensors [--dtype=bfloat16|float32]
    qat-jax generate --workdir=DIR|--export=FILE [--prompt=TEXT ...] [--max_tokens=N]
                    [--temperature=T --top_p=P --seed=S]
    qat-jax sweep   --workdir=DIR --fractions=0.1,0.4 [--bits=2,4] [--fused=both] [--config=...]
                    [--controls] [--fixed_fractions=0.2,0.5 --fixed_cooldown=0.1]
    qat-jax fit     --runs=runs.jsonl|table.csv --law=qat --out=law.json [--plots=DIR]
                    [--law_options=chinchilla_tokens=fp,s_fp_floor=0.01]
    qat-jax plan    --params=N|--config=FILE --tokens=D --bits=B [--law=law.json]
                    | --memory=8GB --tokens=D --law=law.json [--config=FILE]
    qat-jax repro   --workdir=DIR [--quick] [--second_corpus=python-doc|pydoc-topics|none|GLOB]
                    | --workdir=DIR --regenerate
    qat-jax compile [--config=...] --topology=v5p:4x4x2 | --devices=N [--hbm=16GiB]

Each command has its own absl flags; `--config` is an ml_collections config file (optionally
`file.py:arg`), locked, so an unknown key or a wrong type is an error.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from absl import flags
from ml_collections import config_flags

import configs
from qat_jax import cli_law, cli_model, cli_process, runconfig
from qat_jax.errors import UsageError, UserError, describe_os_error

DEFAULT_CONFIG = str(Path(configs.__file__).parent / "tiny.py")


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand of `qat-jax`: its one-line help, the flags it declares, and what it runs
    (parsed flag values -> exit code). A command that takes `--config` uses `config_default`
    without one (None: no config unless given)."""

    name: str
    help: str
    flags: Callable[[flags.FlagValues], None]
    run: Callable[[flags.FlagValues], int]
    takes_config: bool = False
    config_default: str | None = DEFAULT_CONFIG


def _config_flag(fv: flags.FlagValues, argv: list[str], default: str = DEFAULT_CONFIG):
    # sys_argv: the overrides are read from this command's arguments, not the process's.
    config_flags.DEFINE_config_file(
        "config", default, "config file (path, or path:arg such as configs/paper.py:759m); "
        "override keys with --config.group.key=value", flag_values=fv, lock_config=True,
        sys_argv=argv)


def _distributed_flags(fv: flags.FlagValues):
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host; on "
                      "TPU pods and SLURM it finds its peers itself)", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host GPUs)",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-host GPUs)",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index (multi-host GPUs)",
                         flag_values=fv)


def _train_flags(fv: flags.FlagValues):
    flags.DEFINE_string("workdir", None, "run directory (default: workdirs/<config>-<time>); "
                        "an existing one is resumed", flag_values=fv)
    flags.DEFINE_string("init_from", None, "a Hugging Face Llama directory to start from: sets "
                        "model.init_from and, when data.tokenizer is unset, its tokenizer.model",
                        flag_values=fv)
    _distributed_flags(fv)


def _sweep_flags(fv: flags.FlagValues):
    from qat_jax import sweep

    flags.DEFINE_string("workdir", None, "the sweep's directory (trunk/, runs/NAME/, "
                        "runs.jsonl); an existing one is resumed", flag_values=fv)
    flags.DEFINE_list("fractions", None, "QAT fractions in [0, 1]; 0 is the full-precision "
                      "run, 1 QAT from scratch", flag_values=fv)
    flags.DEFINE_list("bits", [], "bit widths (default: the config's quant.bits)",
                      flag_values=fv)
    flags.DEFINE_enum("fused", None, list(sweep.MODES), "fused cooldown, unfused, or "
                      "both (default: the config's qat.fused_cooldown)", flag_values=fv)
    flags.DEFINE_bool("controls", False, "add each fused QAT run's schedule-matched FP "
                      "control (the identical LR schedule, off the same trunk): runs.jsonl "
                      "then gives every fused run's `control`, its QAT penalty's baseline",
                      flag_values=fv)
    flags.DEFINE_list("fixed_fractions", [], "QAT fractions of fused runs whose LR cooldown is "
                      "the last --fixed_cooldown of the budget at every fraction (the "
                      "cooldown's length not tied to f)", flag_values=fv)
    flags.DEFINE_float("fixed_cooldown", 0.1, "the cooldown share of --fixed_fractions' runs",
                       flag_values=fv)
    _distributed_flags(fv)


def _prepare_flags(fv: flags.FlagValues):
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


def _bench_flags(fv: flags.FlagValues):
    flags.DEFINE_integer("steps", 10, "timed steps (after one compile step)", flag_values=fv)
    flags.DEFINE_integer("ops", 0, "also list the N ops that take the most time (a profile "
                         "of 3 steps)", flag_values=fv)
    flags.DEFINE_list("qat_bits", [], "also time QAT at these bit widths (e.g. 1,2,4) and "
                      "report QAT / FP step time, measured in this process", flag_values=fv)


def _compile_flags(fv: flags.FlagValues):
    flags.DEFINE_string("topology", "", "a TPU topology, e.g. v5p:4x4x2 (needs libtpu: "
                        "pip install -e \".[tpu]\")", flag_values=fv)
    flags.DEFINE_integer("devices", None, "compile for this many CPU devices instead",
                         flag_values=fv)
    flags.DEFINE_string("hbm", "", "memory per device, e.g. 16GiB (default: the chip's)",
                        flag_values=fv)
    flags.DEFINE_integer("suggest", 6, "when it does not fit, compile up to this many "
                         "other settings for one that does (0: none)", flag_values=fv)


def _repro_flags(fv: flags.FlagValues):
    flags.DEFINE_string("workdir", None, "the study's directory; an existing one is resumed",
                        flag_values=fv)
    flags.DEFINE_bool("quick", False, "the quick grid (a smoke test of the pipeline, 36 runs, "
                      "two sizes) instead of the full one (252 runs; times in "
                      "docs/REPRODUCTION.md)",
                      flag_values=fv)
    flags.DEFINE_string("resume_from", None, "a committed study's directory (docs/repro): a "
                        "new --workdir starts from it, taking the points complete in its table "
                        "instead of training them (the corpus rebuilt and checked against its "
                        "hash)", flag_values=fv)
    flags.DEFINE_bool("regenerate", False, "no training: make the report (law.json, "
                      "report.json, REPORT.md, plots/) again in --workdir from its runs.jsonl "
                      "and study.json (e.g. --workdir=docs/repro, the committed study)",
                      flag_values=fv)
    flags.DEFINE_string("second_corpus", "python-doc", "text beside the Bible: python-doc "
                        "(Debian's python3.11-doc, fetched with apt-get download if not "
                        "installed), pydoc-topics (the stdlib's), none, or a glob of text "
                        "files", flag_values=fv)


def _define(command: Command, argv: list[str]) -> flags.FlagValues:
    """The flags of `command` (with --config when it takes one, its overrides read from argv)."""
    fv = flags.FlagValues()
    if command.takes_config:
        _config_flag(fv, argv, command.config_default)
    command.flags(fv)
    return fv


def _resolve_config(argv: list[str]) -> list[str]:
    """`--config=FILE[:ARG]`: FILE as given, else in the shipped configs/ folder."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path, sep, extra = arg[len("--config="):].partition(":")
            shipped_dir = Path(DEFAULT_CONFIG).parent
            shipped = shipped_dir / Path(path).name  # `configs/tiny.py` from any directory
            if not os.path.isfile(path) and os.path.isfile(shipped):
                path = str(shipped)
            elif not os.path.isfile(path):
                known = sorted(p.name for p in shipped_dir.glob("*.py") if p.stem[0] != "_")
                raise UsageError(f"--config={path}: no such file (shipped configs: {known})")
            arg = f"--config={path}{sep}{extra}"
        out.append(arg)
    return out


def _parse(command: str, argv: list[str]) -> flags.FlagValues:
    full = ["qat-jax " + command, *_resolve_config(argv)]
    stray = [a for a in argv if not a.startswith("-")]
    if stray:
        raise UsageError(f"unexpected argument {stray[0]!r}: flags take the form --name=value"
                         + (f" (did you mean --config={stray[0]}?)" if ".py" in stray[0] else
                            "") + f". See `qat-jax {command} --help`.")
    if COMMANDS[command].takes_config:
        given = [a[len("--config="):] for a in full if a.startswith("--config=")]
        default = COMMANDS[command].config_default
        if given or default:
            config = runconfig.load_config_file(given[-1] if given else default)
            runconfig.check_overrides(config, argv)
    try:
        fv = _define(COMMANDS[command], full)
        fv(full)
    except flags.Error as e:
        text = str(e)
        if "Traceback" in text:  # a config file that raised: its own message is the last line
            lines = [line for line in text.splitlines() if line.strip()]
            text = f"{lines[0].rstrip(': ')}: {lines[-1].strip()}"
        raise UsageError(f"{text}\nSee `qat-jax {command} --help`.") from None
    except (AttributeError, KeyError, OSError, ImportError, TypeError, ValueError) as e:
        raise UsageError(f"cannot load --config: {e}") from None
    return fv


def _usage() -> str:
    lines = ["usage: qat-jax COMMAND [flags]   (`qat-jax COMMAND --help` for its flags)", "",
             "commands:"]
    lines += [f"  {c.name:8s} {c.help}" for c in COMMANDS.values()]
    return "\n".join(lines)


def cmd_train(fv) -> int:
    from qat_jax import train

    cli_process.init_distributed(fv)
    workdir = fv.workdir or os.path.join(
        "workdirs", f"{Path(fv['config'].config_filename).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = fv.config
    if fv.init_from:
        keys = {"model.init_from": fv.init_from}
        tokenizer = Path(fv.init_from) / "tokenizer.model"
        if not config.data.tokenizer and tokenizer.is_file():
            keys["data.tokenizer"] = str(tokenizer)
        config = runconfig.config_with(config, **keys)
    result = train.train(config, workdir)
    import jax

    if "preempted" in result:
        return 130 if result["signal"] == "SIGINT" else 0
    if jax.process_index() != 0:
        return 0
    print(f"\ndone in {result['wall_s']:.0f} s: {result['steps']} steps, {result['tokens']:,} "
          f"tokens, {result['flops']:.3g} FLOPs, N = {result['N']:,}\n"
          f"validation loss {result['val_loss']:.4f} nats (perplexity {result['val_ppl']:.2f}); "
          f"unigram entropy of the corpus {result['unigram_entropy']:.4f} nats\n"
          f"results: {workdir}/result.json, metrics: {workdir}/metrics.jsonl, "
          f"TensorBoard: tensorboard --logdir {workdir}")
    return 0


def cmd_prepare(fv) -> int:
    from qat_jax import prepare

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


def cmd_sweep(fv) -> int:
    from qat_jax import quant, sweep

    if not fv.workdir or not fv.fractions:
        raise UsageError("--workdir and --fractions are required")
    try:
        fractions = [float(f) for f in fv.fractions]
    except ValueError:
        raise UsageError(f"--fractions={','.join(fv.fractions)}: not a list of numbers") from None
    config = fv.config
    try:
        bits = [quant.quantizer(float(b)).bits for b in fv.bits]
    except ValueError as e:
        raise UsageError(f"--bits: {e}") from None
    if not bits and config.quant.bits is not None:
        bits = [config.quant.bits]
    if not bits and any(f > 0 for f in fractions):
        raise UsageError("--bits is required (the config's quant.bits is None)")
    try:
        fixed = [float(f) for f in fv.fixed_fractions]
    except ValueError:
        raise UsageError(f"--fixed_fractions={','.join(fv.fixed_fractions)}: not a list of "
                         f"numbers") from None
    if fixed and not bits:
        raise UsageError("--fixed_fractions needs --bits (the config's quant.bits is None)")
    modes = sweep.MODES[fv.fused] if fv.fused else (config.qat.fused_cooldown,)
    cli_process.init_distributed(fv)
    summary = sweep.run_sweep(config, fv.workdir, fractions, bits, modes,
                              controls=fv.controls, fixed_cooldown=fv.fixed_cooldown,
                              fixed_fractions=fixed)
    import jax

    if jax.process_index() == 0:
        print(f"\n{sweep.format_table(summary)}\nruns: {fv.workdir}/runs.jsonl, summary: "
              f"{fv.workdir}/sweep.json")
        if summary["preempted"]:
            print(f"{summary['preempted']}: the sweep stopped after a checkpoint; rerun the "
                  f"same command to resume it")
    return _exit_code(summary)


def cmd_repro(fv) -> int:
    from qat_jax.study import grids, repro
    if not fv.workdir:
        raise UsageError("--workdir is required")
    if fv.regenerate:
        report = repro.regenerate(fv.workdir)
    else:
        report = repro.run(fv.config, fv.workdir, grids.GRIDS["quick" if fv.quick else "full"],
                           fv.second_corpus, fv.resume_from)
    print(f"\n{report['n_runs']} runs; wall {report['timing']['seconds'] / 60:.1f} min")
    for k, c in sorted(report["claims"].items()):
        print(f"claim {k}: {c['verdict']}")
    if report["grid"]["smoke"]:
        print("(a smoke test of the pipeline, not evidence: the full grid is the study)")
    print(f"report: {fv.workdir}/REPORT.md, plots: {fv.workdir}/plots/")
    if report["preempted"]:
        print(f"{report['preempted']}: stopped after a checkpoint; rerun the same command to "
              f"resume")
    return _exit_code(report)


def _exit_code(summary: dict) -> int:
    """130 after Ctrl-C (as a shell expects), 1 when a run failed, else 0."""
    return 130 if summary["preempted"] == "SIGINT" else 1 if summary["failed"] else 0


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


COMMANDS = {c.name: c for c in [
    Command("train", "train a model (or resume the run in --workdir)", _train_flags, cmd_train,
            takes_config=True),
    Command("eval", "validation loss / perplexity of the latest checkpoint in --workdir",
            cli_model.eval_flags, cli_model.cmd_eval),
    Command("prepare", "tokenize a text corpus into ArrayRecord shards for "
            "`data.source=array_record`", _prepare_flags, cmd_prepare),
    Command("bench", "time the train step and report tokens/s, FLOP/s and MFU", _bench_flags,
            cmd_bench, takes_config=True),
    Command("export", "write a quantized run's model as packed integer codes + scales "
            "(safetensors)", cli_model.export_flags, cli_model.cmd_export),
    Command("generate", "text from a run's model (as served) or an export, with a KV cache",
            cli_model.generate_flags, cli_model.cmd_generate),
    Command("sweep", "QAT fractions x bit widths at one budget, branching off one FP trunk",
            _sweep_flags, cmd_sweep, takes_config=True),
    Command("fit", "fit a loss law (the paper's QAT law, Chinchilla, ...) to a runs table",
            cli_law.fit_flags, cli_law.cmd_fit),
    Command("plan", "the optimal QAT fraction / bit width for a budget, from a law or the "
            "closed form", cli_law.plan_flags, cli_law.cmd_plan, takes_config=True,
            config_default=None),
    Command("repro", "the paper's study at laptop scale: sweeps, fitted law, plots, "
            "claim-by-claim report", _repro_flags, cmd_repro, takes_config=True,
            config_default=str(Path(DEFAULT_CONFIG).parent / "repro.py")),
    Command("compile", "compile the train step for a TPU topology or N CPU devices: memory, "
            "FLOPs, collectives, roofline", _compile_flags, cmd_compile, takes_config=True),
]}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"qat-jax: unknown command {command!r}\n{_usage()}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help", "--helpfull") for a in rest):
        print(f"usage: qat-jax {command} [flags]\n\n{COMMANDS[command].help}.\n")
        print(_define(COMMANDS[command], ["qat-jax " + command]).get_help())
        return 0
    cli_process.setup_logging()
    from qat_jax.ckpt import CheckpointWriteError

    try:
        return COMMANDS[command].run(_parse(command, rest))
    except UserError as e:  # every module's user-facing error: the message, no traceback
        print(f"qat-jax {command}: error: {e}", file=sys.stderr)
        if isinstance(e, CheckpointWriteError):
            # A failed save leaves orbax's writer threads mid-write; at interpreter exit their
            # callbacks print tracebacks into a closed event loop. Our files are closed and the
            # lock dies with the process: end it here.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:  # a read-only or full disk, a path through a file, ...
        print(f"qat-jax {command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except (RuntimeError, AssertionError) as e:
        platforms = os.environ.get("JAX_PLATFORMS")
        if not (platforms and cli_process.in_backend_start(e)):
            raise
        detail = (str(e).splitlines() or [""])[0][:300] or "no backend started"
        print(f"qat-jax {command}: error: JAX_PLATFORMS={platforms!r} asks for a platform that "
              f"jax cannot start on this host ({detail}): unset it (jax then takes the best one "
              f"here), or install jax for that platform (e.g. pip install -U 'jax[cuda12]')",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves, then stops)
        print(f"qat-jax {command}: interrupted", file=sys.stderr)
        return 130


def run():
    """The `qat-jax` process: main() under cli_process.run's Ctrl-C handling."""
    cli_process.run(main)
