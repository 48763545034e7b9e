"""`qat-jax sweep`: the paper's experiment design, a grid of QAT fractions x bit widths (x fused
or unfused cooldown) at one token budget, training the shared FP trunk once (METHOD.md
section 1).

Every run of the grid follows the same warmup-stable FP schedule up to its `Plan.trunk_end`
(its QAT start, or the start of its own FP cooldown).

With `controls`, every fused QAT run gets a schedule-matched full-precision control: the same
LR schedule (its cooldown over the same last steps, branched off the trunk at the same step),
no quantization. With a fused cooldown the QAT fraction is also the cooldown's length, so a
QAT run's loss minus its control's is what quantization costs at that fraction, with the
schedule's own effect taken out (docs/METHOD.md section 4). A control whose schedule is the
FP-only run's is that run. The trunk is that schedule, trained once
and checkpointed at every branch point; each run restores the trunk's checkpoint at its branch
point (parameters, optimizer state and data position) and trains only the rest. A branch is
the run it stands for, bit for bit (tested against a straight run).

Layout of the sweep's directory:

    trunk/        the FP trunk (a train workdir that stops at the last branch point)
    runs/NAME/    one train workdir per run: fp, b2-f0.25-fused, b4-f0.1-unfused, and the
                  controls fp-c0.25, ... (full precision, cooldown over the last 25%)
    runs.jsonl    one JSON object per finished run, with the keys the law fitter reads
    sweep.json    the grid, and the compute it took against training every run from scratch

Rerunning the same command skips finished runs and resumes unfinished ones; a failed run is
reported and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import traceback
from pathlib import Path

from qat_jax import ckpt, console, files, phases, resolve, runconfig, rundir, train
from qat_jax.errors import UserError

log = logging.getLogger(__name__)

MODES = {"true": (True,), "false": (False,), "both": (True, False)}


@dataclasses.dataclass(frozen=True)
class Run(phases.Run):
    """A run of the sweep: its config resolved (resolve.resolve), and its name."""

    name: str = ""


def named(run: phases.Run, name: str) -> Run:
    """`run` (resolve.resolve's) as a run of the sweep called `name`."""
    return Run(**{f.name: getattr(run, f.name) for f in dataclasses.fields(phases.Run)},
               name=name)


def grid(config, fractions, bits_list, fused_modes, unfused_fractions=None,
         controls: bool = False, fixed_cooldown: float = 0.0,
         fixed_fractions=()) -> list[Run]:
    """The runs of the sweep: a full-precision run for fraction 0 (B = 16), and one run per
    bit width, fraction and cooldown mode otherwise (fraction 1 has no FP phase, so fused and
    unfused are one run). With `unfused_fractions`, unfused runs are made at those fractions
    only. With `fixed_cooldown` > 0, fused runs at `fixed_fractions` whose cooldown is that
    share of the budget whatever the fraction (`fixed_cooldown_run`), so that the QAT fraction
    and the cooldown's length are no longer one number. With `controls`, a schedule-matched FP
    control per fused QAT schedule (`control`). Raises resolve.ConfigError for the first
    invalid one."""
    runs = {}
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise resolve.ConfigError(f"--fractions: {f:g} is not in [0, 1]")
        for bits in ([None] if f == 0 else bits_list):
            for fused in fused_modes:
                if not fused and unfused_fractions is not None and f not in unfused_fractions:
                    continue
                # the fraction as the run's name spells it (6 significant digits)
                c = runconfig.config_with(config, **{
                    "quant.bits": bits, "qat.fraction_policy": "fixed",
                    "qat.fraction": float(f"{f:g}"), "qat.fused_cooldown": fused})
                r = resolve.resolve(c)
                name = "fp" if r.plan.bits is None else (
                    f"b{bits:g}-f{f:g}-{'fused' if r.plan.fused else 'unfused'}")
                runs.setdefault(name, named(r, name))
    for f in fixed_fractions:
        for bits in bits_list:
            r = fixed_cooldown_run(config, bits, f, fixed_cooldown)
            runs.setdefault(r.name, r)
    if controls:
        schedules = {_schedule(r.plan) for r in runs.values() if r.plan.bits is None}
        for r in list(runs.values()):
            if r.plan.fused and r.plan.cooldown_start < r.plan.total_steps:
                ctrl = control(config, r.plan)
                if _schedule(ctrl.plan) not in schedules:
                    schedules.add(_schedule(ctrl.plan))
                    runs.setdefault(ctrl.name, ctrl)
    return list(runs.values())


def _schedule(p: phases.Plan) -> tuple[int, int, int]:
    """What fixes a full-precision run's LR schedule: the warmup and cooldown boundaries."""
    return p.warmup_steps, p.cooldown_start, p.total_steps


def fixed_cooldown_run(config, bits: float, f: float, share: float) -> Run:
    """A fused QAT run at fraction f whose LR cooldown is the last `share` of the budget (inside
    the QAT phase: f >= share), named b{bits}-f{f}-fused-cool{share}."""
    if not 0.0 < share <= f <= 1.0:
        raise resolve.ConfigError(f"a fixed cooldown of {share:g} of the budget needs a QAT "
                                   f"fraction in [{share:g}, 1] to hold it (got {f:g})")
    c = runconfig.config_with(config, **{"quant.bits": bits, "qat.fraction_policy": "fixed",
                                         "qat.fraction": float(f"{f:g}"),
                                         "qat.fused_cooldown": True})
    p = resolve.plan(c)
    cool = round(share * p.total_steps)  # the cooldown's steps, inside the QAT phase
    c = runconfig.config_with(c, **{"qat.cooldown_frac": cool / (p.total_steps - max(
        p.qat_start, p.warmup_steps))})
    r = resolve.resolve(c)
    p = r.plan
    assert p.total_steps - p.cooldown_start == cool, (p, cool)
    return named(r, f"b{bits:g}-f{f:g}-fused-cool{share:g}")


def control(config, p: phases.Plan) -> Run:
    """The schedule-matched FP control of a fused QAT run planned as `p`: full precision, its
    cooldown over the same last steps (schedule.cooldown_frac set so that it starts at
    p.cooldown_start exactly), hence the same LR at every step and the same branch point."""
    share = (p.total_steps - p.cooldown_start) / p.total_steps
    c = runconfig.config_with(config, **{"quant.bits": None, "schedule.cooldown_frac": share})
    r = resolve.resolve(c)
    assert _schedule(r.plan) == (p.warmup_steps, p.cooldown_start, p.total_steps), (r.plan, p)
    return named(r, f"fp-c{share:.4g}")


# Groups that do nothing in the trunk (full precision, no cooldown): they are kept as the trunk
# was started with, so that a rerun that changes only how QAT is done (the fix for a branch
# that diverged) branches off the same trunk.
TRUNK_UNUSED = ("qat", "quant")


def trunk_config(config, trunk_dir: Path | None = None):
    """The shared FP schedule: no quantization, no cooldown (stable LR to the end). Its
    TRUNK_UNUSED groups are base.py's defaults, or those the trunk in `trunk_dir` was saved
    with."""
    from qat_jax.configs import base

    source = json.loads(base.get_config().to_json_best_effort())
    saved = None if trunk_dir is None else trunk_dir / "config.json"
    if saved is not None and saved.exists():
        old = runconfig.upgrade_saved(files.read_json(
            saved, f"move {trunk_dir} aside to train the trunk again"))
        source = {g: {**source[g], **{k: v for k, v in (old.get(g) or {}).items()
                                      if k in source[g]}} for g in TRUNK_UNUSED}
    keys = {f"{g}.{k}": v for g in TRUNK_UNUSED for k, v in source[g].items()}
    return runconfig.config_with(config, **{**keys, "quant.bits": None,
                                            "schedule.cooldown_frac": 0.0})


def _finished(workdir: Path) -> dict | None:
    path = workdir / "result.json"
    if not path.exists():
        return None
    return files.read_json(path, f"move {workdir} aside to train that run again")


def _train_trunk(trunk: phases.Run, trunk_dir: Path, points: set[int],
                 needed: set[int]) -> dict | None:
    """Train the trunk so that it has a checkpoint at every step in `needed`; returns
    {'preempted': step} if SIGTERM stopped it, else None. A point below the trunk's newest
    checkpoint (a fraction added later) is reached by resuming from the newest one before it."""
    steps = []
    if (trunk_dir / "checkpoints").exists():
        saved = ckpt.Checkpoints(trunk_dir, 1, read_only=True)
        steps = saved.steps()
        saved.close()
    missing = sorted(needed - set(steps))
    if not missing:
        return None
    targets = [m for m in missing if steps and m < steps[-1]] + [missing[-1]]
    for target in targets:
        console.say(f"\n=== trunk: FP steps to {target} (branch points {sorted(points)}) ===")
        out = train.train(trunk, trunk_dir,
                          train.Segment(stop_at=target, keep_steps=tuple(sorted(points))))
        if "preempted" in out:
            return out
    return None


def run_sweep(config, workdir, fractions, bits_list, fused_modes,
              unfused_fractions=None, controls: bool = False, fixed_cooldown: float = 0.0,
              fixed_fractions=()) -> dict:
    """Train the grid (see `grid` and the module docstring); returns the summary also written
    to sweep.json, with 'failed' listing the runs that raised and 'preempted' the signal that
    stopped it (False when none did). One process at a time runs a sweep's directory."""
    workdir = files.path(workdir)
    # the trunk's precision ('auto': what the trunk was started with, else this host's) is
    # every run's: the branches continue its checkpoints
    config = rundir.pin_auto(config, workdir / "trunk")
    # every config checked first
    runs = grid(config, fractions, bits_list, fused_modes, unfused_fractions, controls,
                fixed_cooldown, fixed_fractions)
    files.check_workdir_kind(workdir, "sweep")
    trunk = trunk_config(config, workdir / "trunk")
    trunk = resolve.resolve(trunk)
    with files.WorkdirLock(workdir):
        return _run_sweep(workdir, runs, trunk)


def _check_saved_configs(workdir: Path, runs: list[Run], trunk):
    """Refuse, before anything trains, a sweep directory whose trunk or finished runs were
    trained with another config than this sweep's (a finished run would otherwise be reported
    as this config's result), naming each one and what differs. (An unfinished run with
    another config fails on its own, and the others go on.)"""
    pieces = [("trunk", workdir / "trunk", trunk)]
    pieces += [(f"finished run {r.name}", workdir / "runs" / r.name, r.config) for r in runs
               if _finished(workdir / "runs" / r.name) is not None]
    bad = []
    for label, path, config in pieces:
        diffs = rundir.saved_config_diffs(path, config)
        if diffs:
            bad.append(f"{label} ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''})")
    if bad:
        raise train.RunError(f"sweep {workdir} was trained with another config: {', '.join(bad)}. "
                             f"Its results are not this config's; rerun with the config it was "
                             f"started with, or use a new --workdir")


def _set_aside_failed(workdir: Path, runs: list[Run]):
    """A run the sweep's last invocation reported failed (sweep.json), rerun with another
    config (the fix: a lower qat.peak_lr for a branch that diverged), trains again from the
    trunk; the failed attempt is moved to failed/NAME-K, not deleted."""
    summary = workdir / "sweep.json"
    if not summary.exists():
        return
    failed = files.read_json(summary, "move it aside (the sweep writes it again)").get("failed")
    for r in runs:
        run_dir = workdir / "runs" / r.name
        if (r.name not in (failed or {}) or not run_dir.is_dir()
                or _finished(run_dir) is not None):
            continue
        diffs = rundir.saved_config_diffs(run_dir, r.config)
        if diffs:
            k = 1
            while (workdir / "failed" / f"{r.name}-{k}").exists():
                k += 1
            (workdir / "failed").mkdir(exist_ok=True)
            run_dir.rename(workdir / "failed" / f"{r.name}-{k}")
            console.say(f"run {r.name} failed last time with another config "
                        f"({'; '.join(diffs[:3])}): moved to failed/{r.name}-{k}, trained again")


def _run_sweep(workdir: Path, runs: list[Run], trunk: phases.Run) -> dict:
    trunk_dir = workdir / "trunk"
    _check_saved_configs(workdir, runs, trunk.config)
    _set_aside_failed(workdir, runs)
    points = {r.plan.trunk_end for r in runs if r.plan.trunk_end > 0}
    todo = {r.name: r for r in runs if _finished(workdir / "runs" / r.name) is None}
    console.say(f"sweep {workdir}: {len(runs)} runs ({len(runs) - len(todo)} already finished), "
                f"branch points {sorted(points)} of {runs[0].plan.total_steps} steps")
    stopped = _train_trunk(trunk, trunk_dir, points,
                           {r.plan.trunk_end for r in todo.values() if r.plan.trunk_end > 0})
    failed = {}
    for i, r in enumerate(runs):
        if stopped:
            break
        run_dir = workdir / "runs" / r.name
        if r.name not in todo:
            continue
        console.say(f"\n=== [{i + 1}/{len(runs)}] {r.name}: {r.plan.describe()} ===")
        try:
            out = train.train(r, run_dir,
                              train.Segment(branch_from=(trunk_dir, r.plan.trunk_end)))
        except Exception as e:  # a failed run is reported; the others go on
            failed[r.name] = f"{type(e).__name__}: {e}"
            # A UserError's message says it all; anything else is a bug: its traceback.
            log.error("run %s failed: %s%s", r.name, e if isinstance(e, UserError) else
                      failed[r.name], "" if isinstance(e, UserError)
                      else "\n" + traceback.format_exc())
            continue
        if "preempted" in out:
            stopped = out
    summary = _summarise(workdir, runs, points, failed)
    summary["preempted"] = stopped["signal"] if stopped else False  # 'SIGTERM' or 'SIGINT'
    files.atomic_write(workdir / "sweep.json", json.dumps(summary, indent=2) + "\n")
    return summary


def run_record(result: dict, name: str, workdir: Path, p: phases.Plan,
               control: str | None = None) -> dict:
    """One line of runs.jsonl: the law fitter's keys (N, N_nonembed, D_fp, D_qat, B, loss,
    D_cool: the tokens of the final LR cooldown), then what the run was: `branch`, the trunk
    step it left at, and `control`, the name of the sweep's full-precision run with this
    run's LR schedule (a fused QAT run's control; None where the sweep has none)."""
    return {"N": result["N"], "N_nonembed": result["N_nonembed"], "D_fp": result["D_fp"],
            "D_qat": result["D_qat"], "B": result["B"], "loss": result["val_loss"],
            "D_cool": (p.total_steps - p.cooldown_start) * p.tokens_per_step,
            "fused": result["fused"], "fraction": result["qat_fraction"], "S": result["S"],
            "model_bytes": result["model_bytes"], "quant_health": result["quant_health"],
            "flops": result["flops"], "val_loss_fp": result["val_loss_fp"], "name": name,
            "branch": p.trunk_end, "control": control, "workdir": str(workdir)}


def _summarise(workdir: Path, runs: list[Run], points: set[int], failed: dict) -> dict:
    """runs.jsonl, and the compute of the sweep (the trunk counted once) against training every
    run from scratch."""
    records = []
    fp_by_schedule = {_schedule(r.plan): r.name for r in runs if r.plan.bits is None}
    for r in runs:
        result = _finished(workdir / "runs" / r.name)
        if result is not None:
            ctrl = fp_by_schedule.get(_schedule(r.plan)) if r.plan.fused else None
            records.append(run_record(result, r.name, workdir / "runs" / r.name, r.plan, ctrl))
    files.atomic_write(workdir / "runs.jsonl", "".join(json.dumps(x) + "\n" for x in records))
    p = runs[0].plan
    flops_per_token = records[0]["flops"] / p.total_tokens if records else 0.0
    trunk_tokens = max(points, default=0) * p.tokens_per_step
    branch_tokens = sum((r.plan.total_steps - r.plan.trunk_end) * p.tokens_per_step
                        for r in runs)
    scratch_tokens = len(runs) * p.total_tokens
    return {
        "runs": [r.name for r in runs], "finished": [x["name"] for x in records],
        "failed": failed, "branch_points": sorted(points),
        "tokens": trunk_tokens + branch_tokens, "tokens_trunk": trunk_tokens,
        "tokens_branches": branch_tokens, "tokens_from_scratch": scratch_tokens,
        "flops": (trunk_tokens + branch_tokens) * flops_per_token,
        "flops_from_scratch": scratch_tokens * flops_per_token,
        "saved_frac": 1.0 - (trunk_tokens + branch_tokens) / scratch_tokens,
        "records": records,
    }


def format_table(summary: dict) -> str:
    lines = [f"{'run':<22} {'B':>5} {'fraction':>8} {'S':>9} {'D_fp':>12} {'D_qat':>12} "
             f"{'val loss':>9} {'FP weights':>10}"]
    for x in summary["records"]:
        s = "-" if x["S"] is None else f"{x['S']:.3g}"
        fp = "-" if x["val_loss_fp"] is None else f"{x['val_loss_fp']:.4f}"
        lines.append(f"{x['name']:<22} {x['B']:>5g} {x['fraction']:>8.3f} {s:>9} "
                     f"{x['D_fp']:>12,} {x['D_qat']:>12,} {x['loss']:>9.4f} {fp:>10}")
    for name, error in summary["failed"].items():
        lines.append(f"{name:<22} FAILED: {error.splitlines()[0][:160]}")
    lines.append(
        f"compute: trunk {summary['tokens_trunk']:,} + branches {summary['tokens_branches']:,} "
        f"= {summary['tokens']:,} tokens ({summary['flops']:.3g} FLOPs); every run from "
        f"scratch: {summary['tokens_from_scratch']:,} tokens; branching saved "
        f"{100 * summary['saved_frac']:.0f}%")
    return "\n".join(lines)
