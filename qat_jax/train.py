"""The training loop. `train` builds the run's phases (trainstep.Setup: the plan, the optimizer,
one model and jitted step per phase), resumes or initialises the state and hands it to `_Loop`,
which steps it through the phases (calling the QAT phase's `enter`, the switch, at the planned
step), logs, evaluates and checkpoints; then the served model is evaluated and result.json
written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qat_jax import (
    ckpt,
    console,
    data,
    files,
    metrics,
    phases,
    preemption,
    quant,
    rundir,
    sharding,
    sizes,
    xla_cache,
)
from qat_jax.rundir import RunError  # noqa: F401 (the run's error, by its old name too)
from qat_jax.tools import hf
from qat_jax.trainstep import Phase, Setup

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Segment:
    """The part of a run one `train` call trains: the whole run by default. A sweep's pieces:
    `branch_from=(trunk_workdir, step)` starts a run that has no checkpoint yet from the
    trunk's checkpoint at `step` (state and data position) instead of step 0; `stop_at` ends
    the run after that many steps with a checkpoint, without evaluating; `keep_steps` are
    checkpointed and never deleted."""

    branch_from: tuple[str | Path, int] | None = None
    stop_at: int | None = None
    keep_steps: tuple[int, ...] = ()


def train(run: phases.Run, workdir: str | Path, segment: Segment = Segment()) -> dict:
    """Train (or resume) `run` (a config resolved: resolve.resolve) in `workdir`; returns what
    result.json holds, {'stopped_at': step} at a segment's `stop_at`, or {'preempted': step,
    'signal': 'SIGTERM' | 'SIGINT'} when a signal stopped it after a checkpoint.

    One process at a time writes a workdir (files.WorkdirLock); every file it writes is
    written whole or not at all (files.atomic_write; orbax for checkpoints)."""
    if not isinstance(run, phases.Run):
        raise TypeError(f"train.train takes a resolved Run, not a {type(run).__name__}: "
                        f"train.train(resolve.resolve(config), workdir)")
    t_start = time.time()
    workdir = files.path(workdir)  # local, or cloud storage (gs://...)
    config = rundir.pin_auto(run.config, workdir)
    run = dataclasses.replace(run, config=config, execution=dataclasses.replace(
        run.execution, matmul_precision=config.model.matmul_precision))
    xla_cache.use_compilation_cache(run.loop.compile_cache_dir, run.loop.compile_cache_min_s)
    # Signals are requests from here on: a Ctrl-C while the corpus loads or the step compiles
    # stops the run after its first step, with a checkpoint.
    before = rundir.entries(workdir)
    with files.WorkdirLock(workdir), preemption.Preemption() as signals:
        rundir.check(workdir, config, branch=segment.branch_from is not None)
        try:
            return _train(run, workdir, t_start, segment, signals)
        except BaseException:
            rundir.undo_failed_start(workdir, before)
            raise


def _train(run: phases.Run, workdir: Path, t_start: float, segment: Segment,
           signals: preemption.Preemption) -> dict:
    config = run.config
    corpus = data.load_corpus(run.data)  # before compiling: bad data fails fast
    mesh = sharding.make_mesh(run.mesh)
    setup = Setup.create(run, mesh)
    p = setup.plan
    end = p.total_steps if segment.stop_at is None else segment.stop_at
    if not 0 <= end <= p.total_steps:
        raise RunError(f"stop_at={segment.stop_at} is outside the plan's 0..{p.total_steps} "
                       f"steps")
    counts = sizes.param_count(run.model, run.quant)
    console.say(
        f"workdir: {workdir}\nmodel: {counts['total']:,} parameters "
        f"({counts['non_embedding']:,} non-embedding); "
        f"data: {corpus.description}, {len(corpus.train):,} train / {len(corpus.validation):,} "
        f"validation tokens; mesh {dict(mesh.shape)}\nplan: {p.describe()}")
    loop = _Loop(setup, data.train_iterator(corpus, run.data),
                 data.validation_batches(corpus, run.data),
                 ckpt.Checkpoints(workdir, run.loop.max_to_keep, segment.keep_steps),
                 metrics.MetricsWriter(workdir, run.loop.tensorboard), signals, run.loop,
                 frozenset(segment.keep_steps))
    try:
        with jax.set_mesh(mesh), sharding.axis_rules():
            start, state = _start_state(setup, run, loop.checkpoints, loop.data_iter,
                                        segment.branch_from, end)
            if jax.process_index() == 0:  # only once the start (or resume) is known good
                files.atomic_write(workdir / "config.json", config.to_json_best_effort(indent=2))
            loop.writer.drop_after(start)  # rows of steps a killed run did past its checkpoint
            state, stopped_at = loop.run(state, start, end)
            if stopped_at is not None:
                loop.checkpoints.wait()
                console.say(f"{signals.signal}: saved the checkpoint at step {stopped_at}; "
                            f"rerun the same command to resume")
                return {"preempted": stopped_at, "signal": signals.signal}
            loop.checkpoints.save(end, state, loop.data_iter)
            if end < p.total_steps:
                loop.checkpoints.wait()
                return {"stopped_at": end}
            result = _final_evaluation(loop, state, end)
            loop.checkpoints.wait()
        loop.writer.write(end, val_loss=result["val_loss"], val_ppl=result["val_ppl"])
    finally:
        try:
            loop.checkpoints.close()  # waits for a save in flight, whatever ended the run
        finally:
            loop.writer.close()
    result = {**phases.summary(run), **result, "unigram_entropy": corpus.unigram_entropy(),
              "wall_s": time.time() - t_start,
              "final_train_loss": None if loop.last is None else float(loop.last["loss"])}
    if jax.process_index() == 0:
        files.atomic_write(workdir / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def _final_evaluation(loop: _Loop, state, end: int) -> dict:
    """The served model's validation loss at the end of the run; when it is quantized, also
    the same weights without quantization, and the quantizers' health."""
    setup = loop.setup
    served = setup.phase_after(end)
    val = setup.evaluate(state.params, loop.val_batches, served)
    quantized = served is not setup.fp
    return {"val_loss": val, "val_ppl": math.exp(val),
            "val_loss_fp": (setup.evaluate(state.params, loop.val_batches, setup.fp)
                            if quantized else None),
            "quant_health": ({k: float(v) for k, v in jax.device_get(
                served.health(state.params)).items()} if quantized else None)}


def _start_state(setup: Setup, run: phases.Run, checkpoints, data_iter, branch_from,
                 end: int):
    """(step, state) to start from: this run's newest checkpoint (at or before `end`); else the
    trunk's checkpoint at the branch point; else model.init_from's weights or a random draw."""
    spec = run.loop
    restored = checkpoints.restore_latest(setup.abstract_state, data_iter, at_most=end)
    if restored:
        console.say(f"resumed from the checkpoint at step {restored[0]}")
        return restored
    if branch_from is not None and branch_from[1] > 0:
        trunk_dir, step = branch_from
        trunk = ckpt.Checkpoints(trunk_dir, 1, read_only=True)
        try:
            if step not in trunk.steps():
                raise RunError(f"the trunk {trunk_dir} has no checkpoint at step {step} "
                               f"(it has {trunk.steps()}); rerun the sweep to train it")
            restored = trunk.restore_latest(setup.abstract_state, data_iter, at_most=step)
        finally:
            trunk.close()
        if restored is None or restored[0] != step:
            raise RunError(f"the trunk checkpoint {trunk_dir} at step {step} is unreadable")
        console.say(f"branched off the trunk {trunk_dir} at step {step}")
        return restored
    if spec.init_from:
        console.say(f"initialised from {spec.init_from}")
        return 0, setup.init_from(hf.load_params(spec.init_from, run.model, run.quant))
    return 0, setup.init(jax.random.key(spec.seed))


def itstime(done: int, every: int, total: int, last: bool = True) -> bool:
    """Whether `done` steps call for an every-N action: at each multiple of `every`, and at
    `total` (the loop's last step) when `last` (after big_vision's u.itstime)."""
    return done % every == 0 or (last and done == total)


@dataclasses.dataclass
class _Loop:
    """The training loop: steps the state from `start` to `end`, each update through the
    phase of its step (setup.phase). Its side effects are one method each: the switch,
    logging, evaluation and checkpoints; a signal (preemption) stops it after a checkpoint."""

    setup: Setup
    data_iter: Any
    val_batches: list
    checkpoints: ckpt.Checkpoints
    writer: metrics.MetricsWriter
    signals: preemption.Preemption
    spec: phases.LoopSpec
    keep_steps: frozenset[int]
    last: dict | None = None  # the last update's metrics (device arrays)
    _losses: list = dataclasses.field(default_factory=list)  # since the last log row
    _t_window: float = 0.0
    _warned: bool = False  # the dead-scales warning is given once
    _progress: Any = None

    def run(self, state, start: int, end: int):
        """(state after `end` steps, None), or (state, step) when a signal stopped it there
        (after a checkpoint)."""
        p, c = self.setup.plan, self.spec
        self._progress, self._t_window = console.Progress(end, start), time.time()
        try:
            for step in range(start, end):
                phase = self.setup.phase(step)
                if step == p.qat_start:  # the FP -> QAT switch (never reached without QAT)
                    state = self._switch(phase, state, step)
                tokens = sharding.shard_batch(next(self.data_iter), self.setup.mesh)
                state, self.last = phase.step(state, tokens)
                self._losses.append(self.last["loss"])  # no host sync until the log step
                done = step + 1
                if itstime(done, c.log_every, end):
                    self._log(state, done)
                if done < p.total_steps and itstime(done, c.eval_every, end, last=False):
                    self._evaluate(state, done)
                stop = self.signals.reached(done)
                # Not orbax's should_save: it refuses any step at or below the newest checkpoint
                # (a sweep's trunk resumes from an older one to save a branch point below its
                # newest), and it would call the multi-host preemption sync point again.
                if (itstime(done, c.checkpoint_every, end, last=False)
                        or done in self.keep_steps or stop):
                    _check_finite(float(self.last["param_norm"]), done, self.checkpoints,
                                  self._remedy(done))
                    self.checkpoints.save(done, state, self.data_iter)
                if stop and done < end:
                    return state, done
        finally:
            self._progress.close()
        return state, None

    def _switch(self, phase: Phase, state, step: int):
        state = phase.enter(state)
        self._progress.message(
            f"step {step}: FP -> QAT at {self.setup.plan.bits:g} bits (scales set from the "
            f"weights; weights' Adam moments "
            f"{'reset' if self.setup.optim.reset_moments else 'kept'})")
        return state

    def _remedy(self, done: int) -> str:
        """The keys to change for a run that diverged at `done`: those of its phase."""
        p, o = self.setup.plan, self.setup.optim
        if p.bits is None or done <= p.qat_start:
            return "Lower optimizer.peak_lr or raise schedule.warmup_frac"
        keys = ["optimizer.peak_lr"] + (["qat.peak_lr (the QAT re-warmup's peak)"]
                                        if not p.fused and o.qat_peak_lr is not None else [])
        return (f"It diverged in the QAT phase at {p.bits:g} bits: lower {' or '.join(keys)}, "
                f"or qat.scale_lr_mult")

    def _log(self, state, done: int):
        p, last = self.setup.plan, self.last
        loss = float(np.mean(jax.device_get(self._losses)))
        _check_finite(loss, done, self.checkpoints, self._remedy(done))
        now = time.time()
        tok_s = len(self._losses) * p.tokens_per_step / (now - self._t_window)
        lr = float(self.setup.lr(done - 1))
        extra = jax.device_get(self.setup.phase_after(done).health(state.params))
        if not self._warned and extra.get("dead_scales", 0) > 0:
            self._progress.message(_dead_warning(done, extra))
            self._warned = True
        self.writer.write(done, tokens=done * p.tokens_per_step, loss=loss, lr=lr,
                          grad_norm=last["grad_norm"], param_norm=last["param_norm"],
                          tokens_per_s=tok_s, phase=int(p.quantized_after(done)), **extra)
        self._progress.update(done, loss, lr, tok_s)
        self._losses, self._t_window = [], now

    def _evaluate(self, state, done: int):
        val = self.setup.evaluate(state.params, self.val_batches, self.setup.phase_after(done))
        self.writer.write(done, val_loss=val, val_ppl=math.exp(val))
        self._progress.message(f"step {done}: validation loss {val:.4f} "
                               f"(ppl {math.exp(val):.2f})")


def _dead_warning(step: int, health: dict) -> str:
    return (f"warning: step {step}: {int(health['dead_scales'])} quantizer scales "
            f"({100 * float(health['dead_frac']):.1f}%) sit at the floor {quant.SCALE_FLOOR:g}: "
            f"their output channels are dead (every weight clipped, no gradient passes) and "
            f"will not recover. qat.scale_update='relative' (the default) or a lower "
            f"qat.scale_lr_mult keeps scales off the floor (docs/SCALES.md)")


def _check_finite(value: float, step: int, checkpoints: ckpt.Checkpoints, remedy: str):
    """Stop on a non-finite training loss or parameter norm, keeping the checkpoints."""
    if not math.isfinite(value):
        checkpoints.wait()  # a save in flight is a good one: let it land before reporting
        kept = checkpoints.steps()
        raise RunError(f"training diverged (non-finite loss or parameters: {value}) at step "
                       f"{step}; stopped without saving. Last good checkpoint: "
                       f"{f'step {kept[-1]}' if kept else 'none'}. {remedy}")
