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

from qat_jax import cli_law, cli_model, cli_process, cli_runs, cli_tools, configs, runconfig
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


CONFIG_HELP = ("config file (path, or path:arg such as configs/paper.py:759m); override keys "
               "with --config.group.key=value")


def _config_flag(fv: flags.FlagValues, argv: list[str], loaded: tuple[str, object] | None,
                 default: str | None):
    """--config: the config `loaded` from its file once (runconfig.load_config_file), its
    overrides read from this command's arguments (sys_argv), not the process's; its file
    argument kept on the flag (cli_process.config_file). None loaded: for --help, the flag as text
    (nothing executed); for a command whose --config is optional and not given, a config-file
    flag without a file."""
    if loaded is None and default is not None:  # --help: shown, never parsed
        flags.DEFINE_string("config", default, CONFIG_HELP, flag_values=fv)
        return
    if loaded is None:
        config_flags.DEFINE_config_file("config", None, CONFIG_HELP, flag_values=fv,
                                        lock_config=True, sys_argv=argv)
        return
    arg, config = loaded
    config_flags.DEFINE_config_dict("config", config, CONFIG_HELP, flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    fv["config"].file_argument = arg  # cli_process.config_file


def _train_flags(fv: flags.FlagValues):
    flags.DEFINE_string("workdir", None, "run directory (default: workdirs/<config>-<time>); "
                        "an existing one is resumed", flag_values=fv)
    flags.DEFINE_string("init_from", None, "a Hugging Face Llama directory to start from: sets "
                        "model.init_from and, when data.tokenizer is unset, its tokenizer.model",
                        flag_values=fv)
    cli_process.distributed_flags(fv)


def _define(command: Command, argv: list[str],
            loaded: tuple[str, object] | None = None) -> flags.FlagValues:
    """The flags of `command` (with --config when it takes one: the config `loaded`, its
    overrides read from argv)."""
    fv = flags.FlagValues()
    if command.takes_config:
        _config_flag(fv, argv, loaded, command.config_default)
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
    loaded = None
    if COMMANDS[command].takes_config:
        given = [a[len("--config="):] for a in full if a.startswith("--config=")]
        default = COMMANDS[command].config_default
        if given or default:  # the file is executed here, once
            arg = given[-1] if given else default
            loaded = (arg, runconfig.load_config_file(arg))
            runconfig.check_overrides(loaded[1], argv)
            full = [a for a in full if not a.startswith("--config=")]
    try:
        fv = _define(COMMANDS[command], full, loaded)
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
    from qat_jax import resolve, train

    cli_process.init_distributed(fv)
    stem = Path(cli_process.config_file(fv).partition(":")[0]).stem
    workdir = fv.workdir or os.path.join("workdirs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = fv.config
    if fv.init_from:
        keys = {"model.init_from": fv.init_from}
        tokenizer = Path(fv.init_from) / "tokenizer.model"
        if not config.data.tokenizer and tokenizer.is_file():
            keys["data.tokenizer"] = str(tokenizer)
        config = runconfig.config_with(config, **keys)
    result = train.train(resolve.resolve(config), workdir)
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


COMMANDS = {c.name: c for c in [
    Command("train", "train a model (or resume the run in --workdir)", _train_flags, cmd_train,
            takes_config=True),
    Command("eval", "validation loss / perplexity of the latest checkpoint in --workdir",
            cli_model.eval_flags, cli_model.cmd_eval),
    Command("prepare", "tokenize a text corpus into ArrayRecord shards for "
            "`data.source=array_record`", cli_tools.prepare_flags, cli_tools.cmd_prepare),
    Command("bench", "time the train step and report tokens/s, FLOP/s and MFU",
            cli_tools.bench_flags, cli_tools.cmd_bench, takes_config=True),
    Command("export", "write a quantized run's model as packed integer codes + scales "
            "(safetensors)", cli_model.export_flags, cli_model.cmd_export),
    Command("generate", "text from a run's model (as served) or an export, with a KV cache",
            cli_model.generate_flags, cli_model.cmd_generate),
    Command("sweep", "QAT fractions x bit widths at one budget, branching off one FP trunk",
            cli_runs.sweep_flags, cli_runs.cmd_sweep, takes_config=True),
    Command("fit", "fit a loss law (the paper's QAT law, Chinchilla, ...) to a runs table",
            cli_law.fit_flags, cli_law.cmd_fit),
    Command("plan", "the optimal QAT fraction / bit width for a budget, from a law or the "
            "closed form", cli_law.plan_flags, cli_law.cmd_plan, takes_config=True,
            config_default=None),
    Command("repro", "the paper's study at laptop scale: sweeps, fitted law, plots, "
            "claim-by-claim report", cli_runs.repro_flags, cli_runs.cmd_repro, takes_config=True,
            config_default=str(Path(DEFAULT_CONFIG).parent / "repro.py")),
    Command("compile", "compile the train step for a TPU topology or N CPU devices: memory, "
            "FLOPs, collectives, roofline", cli_tools.compile_flags, cli_tools.cmd_compile,
            takes_config=True),
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
