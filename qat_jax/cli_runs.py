"""`qat-jax sweep` and `qat-jax repro`: their flags and what they run (the command line:
qat_jax/cli.py)."""

from __future__ import annotations

from absl import flags

from qat_jax import cli_process
from qat_jax.errors import UsageError


def sweep_flags(fv: flags.FlagValues):
    from qat_jax.tools import sweep

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
    cli_process.distributed_flags(fv)


def cmd_sweep(fv) -> int:
    from qat_jax import quant
    from qat_jax.tools import sweep

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


def _exit_code(summary: dict) -> int:
    """130 after Ctrl-C (as a shell expects), 1 when a run failed, else 0."""
    return 130 if summary["preempted"] == "SIGINT" else 1 if summary["failed"] else 0


def repro_flags(fv: flags.FlagValues):
    flags.DEFINE_string("workdir", None, "the study's directory; an existing one is resumed",
                        flag_values=fv)
    flags.DEFINE_bool("quick", False, "the quick grid (a smoke test of the pipeline, 36 runs, "
                      "two sizes) instead of the full one (444 runs; times in "
                      "docs/REPRODUCTION.md); the same as --grid=quick",
                      flag_values=fv)
    flags.DEFINE_string("grid", "full", "the study's grid, by its name in "
                        "qat_jax/study/grids.py GRIDS: full, quick, or tuned (the full grid "
                        "with each size at its own peak LR)", flag_values=fv)
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


def cmd_repro(fv) -> int:
    from qat_jax.study import grids, repro
    if not fv.workdir:
        raise UsageError("--workdir is required")
    if fv.regenerate:
        report = repro.regenerate(fv.workdir)
    else:
        name = "quick" if fv.quick else fv.grid
        if name not in grids.GRIDS or (fv.quick and fv.grid not in ("full", "quick")):
            raise UsageError(f"--grid={fv.grid!r}{' with --quick' if fv.quick else ''}: give "
                             f"one grid, one of {sorted(grids.GRIDS)}")
        report = repro.run(fv.config, fv.workdir, grids.GRIDS[name], fv.second_corpus,
                           fv.resume_from)
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
