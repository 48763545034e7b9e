"""The train state, the pure train and eval steps, the run's phases, and the training loop.

`train_step` and `eval_step` are module-level pure functions (tests import them). `Setup` holds
the plan (phases.py), the optimizer (optim.py) and one `Phase` per phase of the run: its model
and the steps jitted with the mesh's shardings; `setup.phase(step)` is the phase of an update.
`train` resumes or initialises the state and hands it to `_Loop`, which steps it through the
phases (calling the QAT phase's `enter`, the switch, at the planned step), logs, evaluates and
checkpoints; then the served model is evaluated and result.json written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qat_jax import (
    ckpt,
    console,
    data,
    files,
    hf,
    layout,
    metrics,
    model,
    optim,
    phases,
    preemption,
    qparams,
    quant,
    rundir,
    sharding,
    sizes,
    validate,
    xla_cache,
)
from qat_jax.rundir import RunError  # noqa: F401 (the run's error, by its old name too)

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_model(config, platform: str | None = None) -> model.Decoder:
    return model.Decoder(model.ModelConfig.from_config(config, platform))


def init_state(rng, *, net: model.Decoder, tx: optax.GradientTransformation) -> TrainState:
    """Parameters and optimizer state, boxed with their logical axis names."""
    tokens = jnp.zeros((1, net.cfg.seq_len), jnp.int32)
    params = net.init(rng, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_fn(params, tokens_BL1, *, net: model.Decoder):
    """Mean next-token cross-entropy (nats) of sequences of seq_len + 1 tokens."""
    return net.apply({"params": params}, tokens_BL1[:, :-1], tokens_BL1[:, 1:])


def grads_and_loss(params, tokens_BL1, *, net, grad_accum_steps: int, param_specs=None):
    """Mean loss and its gradient over a batch, summed over `grad_accum_steps` micro-batches
    (one micro-batch's activations in memory at a time).

    With `param_specs` (the parameters' PartitionSpecs) the micro-steps run per device
    (sharding.per_device_batch): weights gathered once, gradients reduced once, so the
    communication does not grow with the number of micro-steps. The price is one whole
    (unsharded over fsdp) copy of the parameters and of the gradients on each device."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, net=net))
    if grad_accum_steps == 1:
        return grad_fn(params, tokens_BL1)

    def accumulated(params, tokens_BL1):
        # [b, L+1] -> [accum, b / accum, L+1] by taking every accum-th row, so each device's
        # contiguous rows stay on it (a local transpose, no communication).
        micro = tokens_BL1.reshape(-1, grad_accum_steps, tokens_BL1.shape[-1]).swapaxes(0, 1)

        def accumulate(carry, tokens):
            return jax.tree.map(jnp.add, carry, grad_fn(params, tokens)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        total, _ = jax.lax.scan(accumulate, zeros, micro)
        return jax.tree.map(lambda x: x / grad_accum_steps, total)

    if param_specs is None:
        return accumulated(params, tokens_BL1)
    return sharding.per_device_batch(accumulated, params, tokens_BL1, param_specs)


def train_step(state: TrainState, tokens_BL1, *, net, tx, grad_accum_steps: int,
               param_specs=None):
    """One optimizer update on a global batch."""
    loss, grads = grads_and_loss(state.params, tokens_BL1, net=net,
                                 grad_accum_steps=grad_accum_steps, param_specs=param_specs)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    # param_norm: the loss is measured before the update, so only the new parameters' norm
    # tells whether this update diverged (checked before every checkpoint).
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                       "param_norm": optax.tree.norm(params)}


def eval_step(params, tokens_BL1, *, net):
    return loss_fn(params, tokens_BL1, net=net)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a run: its model and jitted functions on the mesh."""

    net: model.Decoder  # quant.bits=None in the FP phase, the run's bit width in QAT
    step: Any  # (state, tokens) -> (state, metrics): one update through `net`
    eval: Any  # (params, tokens) -> loss
    enter: Any  # state -> state, once before the phase's first update (QAT: phases.switch)
    health: Any  # params -> quantizer health metrics (qparams.quant_metrics; {} in FP)


@dataclasses.dataclass
class Setup:
    """The plan, the optimizer, the state's shardings on `mesh`, and the run's phases.

    Both phases share one parameter tree. `fp` steps the model with quant.bits=None; `served`
    is the phase whose model the run ends in: QAT for a quantized run, else `fp` itself.
    `phase(step)` says which one update `step` runs."""

    config: Any
    mesh: Any
    plan: phases.Plan
    tx: optax.GradientTransformation
    abstract_state: Any  # TrainState of jax.ShapeDtypeStruct with target shardings
    init: Any  # rng -> TrainState
    init_from: Any  # params (the loop layout, on the host) -> TrainState
    fp: Phase
    served: Phase

    @classmethod
    def create(cls, config, mesh) -> Setup:
        p = phases.plan(config)
        platform = mesh.devices.flat[0].platform  # the target's, which may not be the host's
        tx = optim.make_optimizer(config, p)
        q = quant.QuantConfig.from_config(config)
        net_fp = model.Decoder(model.ModelConfig.from_config(
            config, platform, quant=dataclasses.replace(q, bits=None)))
        init = functools.partial(init_state, net=net_fp, tx=tx)
        with jax.set_mesh(mesh):
            # the key made inside the trace: nothing runs, even for a mesh of abstract devices
            boxed = jax.eval_shape(lambda: init(jax.random.key(0)))
        state_sh = sharding.logical_shardings(boxed, mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.unbox(boxed), state_sh)
        jitted = _Jitter(config, mesh, tx, state_sh)
        fp = Phase(net_fp, jitted.step(net_fp), jitted.eval(net_fp), enter=lambda state: state,
                   health=lambda params: {})
        served = fp
        if p.bits is not None:
            net_qat = make_model(config, platform)
            switch = functools.partial(phases.switch, q=net_qat.cfg.quant, tx=tx,
                                       reset_moments=config.qat.reset_moments)
            served = Phase(net_qat, jitted.step(net_qat), jitted.eval(net_qat),
                           enter=jitted.state_fn(switch),
                           # at log steps only: a fake-quant pass over every weight is not free
                           health=jitted.params_fn(functools.partial(qparams.quant_metrics,
                                                                     q=net_qat.cfg.quant)))
        from_params = jax.jit(lambda params: TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)),
            in_shardings=(state_sh.params,), out_shardings=state_sh)
        return cls(config=config, mesh=mesh, plan=p, tx=tx, abstract_state=abstract,
                   init=jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=state_sh),
                   init_from=lambda params: from_params(
                       layout.restack_layers(params, abstract.params)),
                   fp=fp, served=served)

    @property
    def net(self) -> model.Decoder:
        """The model as served: quantized when the run has a QAT phase."""
        return self.served.net

    def phase(self, step: int) -> Phase:
        """The phase of update `step` (0-based): QAT from plan.qat_start on, FP before."""
        return self.served if step >= self.plan.qat_start else self.fp

    def phase_after(self, done: int) -> Phase:
        """The phase whose model the state after `done` updates is (the switch runs before
        update qat_start, so the state after it is still FP)."""
        return self.served if self.plan.quantized_after(done) else self.fp

    def evaluate(self, params, batches, phase: Phase) -> float:
        """Mean validation loss of `params` through `phase`'s model."""
        losses = [phase.eval(params, sharding.shard_batch(b, self.mesh)) for b in batches]
        return float(np.mean(jax.device_get(losses)))


@dataclasses.dataclass(frozen=True)
class _Jitter:
    """jax.jit with the state's shardings, for each function a Phase holds."""

    config: Any
    mesh: Any
    tx: optax.GradientTransformation
    state_sh: Any  # the TrainState's NamedShardings

    def step(self, net):
        step = functools.partial(train_step, net=net, tx=self.tx,
                                 grad_accum_steps=self.config.optimizer.grad_accum_steps,
                                 param_specs=jax.tree.map(lambda s: s.spec, self.state_sh.params))
        # The old state is donated: its buffers are reused for the new one (halves memory).
        return jax.jit(step, in_shardings=(self.state_sh, sharding.batch_sharding(self.mesh)),
                       out_shardings=(self.state_sh, sharding.replicated(self.mesh)),
                       donate_argnums=0)

    def eval(self, net):
        return jax.jit(functools.partial(eval_step, net=net),
                       in_shardings=(self.state_sh.params, sharding.batch_sharding(self.mesh)),
                       out_shardings=sharding.replicated(self.mesh))

    def state_fn(self, fn):
        return jax.jit(fn, in_shardings=(self.state_sh,), out_shardings=self.state_sh,
                       donate_argnums=0)

    def params_fn(self, fn):
        return jax.jit(fn, in_shardings=(self.state_sh.params,),
                       out_shardings=sharding.replicated(self.mesh))


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


def train(config, workdir: str | Path, segment: Segment = Segment()) -> dict:
    """Train (or resume) the run of `config` in `workdir`; returns what result.json holds,
    {'stopped_at': step} at a segment's `stop_at`, or {'preempted': step, 'signal': 'SIGTERM'
    | 'SIGINT'} when a signal stopped it after a checkpoint.

    One process at a time writes a workdir (files.WorkdirLock); every file it writes is
    written whole or not at all (files.atomic_write; orbax for checkpoints)."""
    t_start = time.time()
    workdir = files.path(workdir)  # local, or cloud storage (gs://...)
    validate.check(config)
    xla_cache.use_compilation_cache(config.compile.cache_dir, config.compile.cache_min_compile_s)
    # Signals are requests from here on: a Ctrl-C while the corpus loads or the step compiles
    # stops the run after its first step, with a checkpoint.
    before = rundir.entries(workdir)
    with files.WorkdirLock(workdir), preemption.Preemption() as signals:
        rundir.check(workdir, config, branch=segment.branch_from is not None)
        try:
            return _train(config, workdir, t_start, segment, signals)
        except BaseException:
            rundir.undo_failed_start(workdir, before)
            raise


def _train(config, workdir: Path, t_start: float, segment: Segment,
           signals: preemption.Preemption) -> dict:
    corpus = data.load_corpus(config)  # before compiling: bad data fails fast
    mesh = sharding.make_mesh(config)
    setup = Setup.create(config, mesh)
    p = setup.plan
    end = p.total_steps if segment.stop_at is None else segment.stop_at
    if not 0 <= end <= p.total_steps:
        raise RunError(f"stop_at={segment.stop_at} is outside the plan's 0..{p.total_steps} "
                       f"steps")
    counts = sizes.param_count(config)
    console.say(
        f"workdir: {workdir}\nmodel: {counts['total']:,} parameters "
        f"({counts['non_embedding']:,} non-embedding); "
        f"data: {corpus.description}, {len(corpus.train):,} train / {len(corpus.validation):,} "
        f"validation tokens; mesh {dict(mesh.shape)}\nplan: {p.describe()}")
    loop = _Loop(setup, data.train_iterator(corpus, config),
                 data.validation_batches(corpus, config),
                 ckpt.Checkpoints(workdir, config.checkpoint.max_to_keep, segment.keep_steps),
                 metrics.MetricsWriter(workdir, config.logging.tensorboard), signals,
                 frozenset(segment.keep_steps))
    try:
        with jax.set_mesh(mesh), sharding.axis_rules():
            start, state = _start_state(setup, loop.checkpoints, loop.data_iter,
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
    result = {**phases.summary(config, p), **result, "unigram_entropy": corpus.unigram_entropy(),
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


def _start_state(setup: Setup, checkpoints, data_iter, branch_from, end: int):
    """(step, state) to start from: this run's newest checkpoint (at or before `end`); else the
    trunk's checkpoint at the branch point; else model.init_from's weights or a random draw."""
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
    if setup.config.model.init_from:
        console.say(f"initialised from {setup.config.model.init_from}")
        return 0, setup.init_from(hf.load_params(setup.config.model.init_from, setup.config))
    return 0, setup.init(jax.random.key(setup.config.seed))


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
    keep_steps: frozenset[int]
    last: dict | None = None  # the last update's metrics (device arrays)
    _losses: list = dataclasses.field(default_factory=list)  # since the last log row
    _t_window: float = 0.0
    _warned: bool = False  # the dead-scales warning is given once
    _progress: Any = None
    _lr: Any = None  # the LR schedule, for the log

    def run(self, state, start: int, end: int):
        """(state after `end` steps, None), or (state, step) when a signal stopped it there
        (after a checkpoint)."""
        p, c = self.setup.plan, self.setup.config
        self._progress, self._t_window = console.Progress(end, start), time.time()
        self._lr = optim.lr_schedule(c, p)
        try:
            for step in range(start, end):
                phase = self.setup.phase(step)
                if step == p.qat_start:  # the FP -> QAT switch (never reached without QAT)
                    state = self._switch(phase, state, step)
                tokens = sharding.shard_batch(next(self.data_iter), self.setup.mesh)
                state, self.last = phase.step(state, tokens)
                self._losses.append(self.last["loss"])  # no host sync until the log step
                done = step + 1
                if itstime(done, c.logging.every_steps, end):
                    self._log(state, done)
                if done < p.total_steps and itstime(done, c.logging.eval_every_steps, end,
                                                    last=False):
                    self._evaluate(state, done)
                stop = self.signals.reached(done)
                # Not orbax's should_save: it refuses any step at or below the newest checkpoint
                # (a sweep's trunk resumes from an older one to save a branch point below its
                # newest), and it would call the multi-host preemption sync point again.
                if (itstime(done, c.checkpoint.every_steps, end, last=False)
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
            f"{'reset' if self.setup.config.qat.reset_moments else 'kept'})")
        return state

    def _remedy(self, done: int) -> str:
        """The keys to change for a run that diverged at `done`: those of its phase."""
        p, q = self.setup.plan, self.setup.config.qat
        if p.bits is None or done <= p.qat_start:
            return "Lower optimizer.peak_lr or raise schedule.warmup_frac"
        keys = ["optimizer.peak_lr"] + (["qat.peak_lr (the QAT re-warmup's peak)"]
                                        if not p.fused and q.peak_lr is not None else [])
        return (f"It diverged in the QAT phase at {p.bits:g} bits: lower {' or '.join(keys)}, "
                f"or qat.scale_lr_mult")

    def _log(self, state, done: int):
        p, last = self.setup.plan, self.last
        loss = float(np.mean(jax.device_get(self._losses)))
        _check_finite(loss, done, self.checkpoints, self._remedy(done))
        now = time.time()
        tok_s = len(self._losses) * p.tokens_per_step / (now - self._t_window)
        lr = float(self._lr(done - 1))
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
