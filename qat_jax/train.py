"""The train state, the pure train and eval steps, and the training loop.

`train_step` and `eval_step` are module-level pure functions (tests import them); `Setup` jits
them once with the mesh's shardings. `train` is the loop: resume or init, step, log, evaluate,
checkpoint, and write result.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import signal
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
    data,
    files,
    metrics,
    model,
    optim,
    phases,
    quant,
    runconfig,
    sharding,
    validate,
)
from qat_jax.errors import UserError

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class RunError(UserError, RuntimeError):
    """A run that cannot start or go on, with what to do about it."""


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


@dataclasses.dataclass
class Setup:
    """The model, optimizer and their jitted steps, with the state's shardings on `mesh`.

    Two models share one parameter tree: `net_fp` (quant.bits=None) and `net_qat` (the run's
    bit width; None for a full-precision run). Each has its own jitted train and eval step."""

    config: Any
    mesh: Any
    net_fp: model.Decoder
    net_qat: model.Decoder | None
    plan: phases.Plan
    tx: optax.GradientTransformation
    abstract_state: Any  # TrainState of jax.ShapeDtypeStruct with target shardings
    init: Any  # rng -> TrainState
    fp_step: Any  # (state, tokens) -> (state, metrics)
    fp_eval: Any  # (params, tokens) -> loss
    # The QAT phase's pieces; None for a run without one.
    qat_step: Any = None  # (state, tokens) -> (state, metrics) through the quantized model
    qat_eval: Any = None
    switch: Any = None  # state -> state at the FP -> QAT switch
    quant_metrics: Any = None  # params -> quantizer health (quant.quant_metrics)

    @classmethod
    def create(cls, config, mesh) -> Setup:
        p = phases.plan(config)
        platform = mesh.devices.flat[0].platform  # the target's, which may not be the host's
        net_fp = model.Decoder(model.ModelConfig.from_config(
            config, platform, quant=dataclasses.replace(quant.QuantConfig.from_config(config),
                                                        bits=None)))
        net_qat = None if p.bits is None else make_model(config, platform)
        tx = optim.make_optimizer(config, p)
        init = functools.partial(init_state, net=net_fp, tx=tx)
        with jax.set_mesh(mesh):
            # the key made inside the trace: nothing runs, even for a mesh of abstract devices
            boxed = jax.eval_shape(lambda: init(jax.random.key(0)))
        state_sh = sharding.logical_shardings(boxed, mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.unbox(boxed), state_sh)
        batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

        def jit_step(net):
            step = functools.partial(train_step, net=net, tx=tx,
                                     grad_accum_steps=config.optimizer.grad_accum_steps,
                                     param_specs=jax.tree.map(lambda s: s.spec,
                                                              state_sh.params))
            # The old state is donated: its buffers are reused for the new one (halves memory).
            return jax.jit(step, in_shardings=(state_sh, batch_sh),
                           out_shardings=(state_sh, repl), donate_argnums=0)

        def jit_eval(net):
            return jax.jit(functools.partial(eval_step, net=net),
                           in_shardings=(state_sh.params, batch_sh), out_shardings=repl)

        qat = {}
        if net_qat is not None:
            q = net_qat.cfg.quant
            switch = functools.partial(phases.switch, q=q, tx=tx,
                                       reset_moments=config.qat.reset_moments)
            qat = dict(
                qat_step=jit_step(net_qat), qat_eval=jit_eval(net_qat),
                switch=jax.jit(switch, in_shardings=(state_sh,), out_shardings=state_sh,
                               donate_argnums=0),
                # At log steps only: a fake-quant pass over every weight is not free.
                quant_metrics=jax.jit(functools.partial(quant.quant_metrics, q=q),
                                      in_shardings=(state_sh.params,), out_shardings=repl))
        return cls(config=config, mesh=mesh, net_fp=net_fp, net_qat=net_qat, plan=p, tx=tx,
                   abstract_state=abstract,
                   init=jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=state_sh),
                   fp_step=jit_step(net_fp), fp_eval=jit_eval(net_fp), **qat)

    @property
    def net(self) -> model.Decoder:
        """The model as served: quantized when the run has a QAT phase."""
        return self.net_qat or self.net_fp

    def evaluate(self, params, batches, quantized: bool) -> float:
        """Mean validation loss of `params` through the quantized or the FP model."""
        fn = self.qat_eval if quantized else self.fp_eval
        losses = [fn(params, sharding.shard_batch(b, self.mesh)) for b in batches]
        return float(np.mean(jax.device_get(losses)))


def _check_workdir(workdir: Path, config):
    """Refuse a finished run's workdir, or one whose run used a different config."""
    result = workdir / "result.json"
    if result.exists():
        raise RunError(f"{workdir} holds a finished run ({result}); it is never overwritten: "
                       f"choose a new --workdir, or move that one aside")
    saved = workdir / "config.json"
    if not saved.exists():
        return
    try:
        old = json.loads(saved.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{saved} is damaged ({e}); if this run was started with the config "
                       f"you gave, move that file aside and rerun to resume it") from None
    diffs = runconfig.config_diffs(old, config)
    if diffs:
        raise RunError(f"{workdir} holds a run with another config; resuming it with this one "
                       f"would mix two runs. Differences: {'; '.join(diffs)}. Use a new --workdir.")


class _Preemption:
    """SIGTERM (preemption) and Ctrl-C (SIGINT) become a request the loop acts on between
    steps: save, then exit. A second Ctrl-C stops at once (the last checkpoint is kept).

    Python's own SIGINT raises KeyboardInterrupt wherever the main thread is, which is lost
    when that is inside a callback of the runtime ("Exception ignored in: _xla_gc_callback"):
    a flag is never lost. On one host our handler sets it. On several hosts every host must
    stop at the same step, so JAX's preemption sync point decides (jax.distributed's service
    catches SIGTERM on all hosts); a flag set on one host alone would leave the others
    waiting in a collective. Ctrl-C is a flag on each host in both cases."""

    def __init__(self):
        self.signal: str | None = None  # 'SIGTERM' or 'SIGINT' once requested
        self._multihost = jax.process_count() > 1

    def __enter__(self):
        self._old = {signal.SIGINT: signal.signal(signal.SIGINT, self._handle)}
        if not self._multihost:
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: now
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            metrics.say("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again "
                        "to stop at once, losing the steps since the last checkpoint)")

    def __exit__(self, *exc):
        for signum, handler in self._old.items():
            signal.signal(signum, handler)

    def reached(self, step: int) -> bool:
        if self.signal == "SIGINT":
            return True
        if self._multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None


def train(config, workdir: str | Path, *, branch_from: tuple[str | Path, int] | None = None,
          stop_at: int | None = None, keep_steps=()) -> dict:
    """Train (or resume) the run of `config` in `workdir`; returns what result.json holds, or
    {'preempted': step, 'signal': 'SIGTERM' | 'SIGINT'} when a signal stopped it after a
    checkpoint.

    A sweep's pieces: `branch_from=(trunk_workdir, step)` starts a run that has no checkpoint
    yet from the trunk's checkpoint at `step` (state and data position) instead of step 0;
    `stop_at` ends the run after that many steps with a checkpoint, without evaluating
    (returns {'stopped_at': step}); `keep_steps` are checkpointed and never deleted.

    One process at a time writes a workdir (files.WorkdirLock); every file it writes is
    written whole or not at all (files.atomic_write; orbax for checkpoints)."""
    t_start = time.time()
    workdir = files.path(workdir)  # local, or cloud storage (gs://...)
    validate.check(config)
    use_compilation_cache(config)
    # Signals are requests from here on: a Ctrl-C while the corpus loads or the step compiles
    # stops the run after its first step, with a checkpoint.
    with files.WorkdirLock(workdir), _Preemption() as preemption:
        _check_workdir(workdir, config)
        return _train(config, workdir, t_start, branch_from, stop_at, keep_steps, preemption)


def _train(config, workdir: Path, t_start: float, branch_from, stop_at, keep_steps,
           preemption) -> dict:
    corpus = data.load_corpus(config)  # before compiling: bad data fails fast
    mesh = sharding.make_mesh(config)
    setup = Setup.create(config, mesh)
    p = setup.plan
    end = p.total_steps if stop_at is None else stop_at
    if not 0 <= end <= p.total_steps:
        raise RunError(f"stop_at={stop_at} is outside the plan's 0..{p.total_steps} steps")
    if jax.process_index() == 0:
        files.atomic_write(workdir / "config.json", config.to_json_best_effort(indent=2))
    counts = model.param_count(config)
    metrics.say(
        f"workdir: {workdir}\nmodel: {counts['total']:,} parameters "
        f"({counts['non_embedding']:,} non-embedding); "
        f"data: {corpus.description}, {len(corpus.train):,} train / {len(corpus.validation):,} "
        f"validation tokens; mesh {dict(mesh.shape)}\nplan: {p.describe()}")

    checkpoints = ckpt.Checkpoints(workdir, config.checkpoint.max_to_keep, keep_steps)
    data_iter = data.train_iterator(corpus, config)
    val_batches = data.validation_batches(corpus, config)
    writer = metrics.MetricsWriter(workdir, config.logging.tensorboard)
    try:
        with jax.set_mesh(mesh), sharding.axis_rules():
            start, state = _start_state(setup, checkpoints, data_iter, branch_from, end)
            writer.drop_after(start)  # rows of steps a killed run did past its checkpoint
            state, last, stopped_at = _loop(setup, state, start, end, data_iter, val_batches,
                                            checkpoints, writer, preemption, set(keep_steps))
            if stopped_at is not None:
                checkpoints.wait()
                metrics.say(f"{preemption.signal}: saved the checkpoint at step {stopped_at}; "
                            f"rerun the same command to resume")
                return {"preempted": stopped_at, "signal": preemption.signal}
            checkpoints.save(end, state, data_iter)
            if end < p.total_steps:
                checkpoints.wait()
                return {"stopped_at": end}
            quantized = p.quantized_after(end)
            val = setup.evaluate(state.params, val_batches, quantized)
            val_fp = setup.evaluate(state.params, val_batches, False) if quantized else None
            health = ({k: float(v) for k, v in jax.device_get(
                setup.quant_metrics(state.params)).items()} if quantized else None)
            checkpoints.wait()
        writer.write(end, val_loss=val, val_ppl=math.exp(val))
    finally:
        try:
            checkpoints.close()  # waits for a save in flight, whatever ended the run
        finally:
            writer.close()
    result = run_summary(config, p)
    result.update({
        "val_loss": val, "val_ppl": math.exp(val), "val_loss_fp": val_fp,
        "quant_health": health,
        "unigram_entropy": corpus.unigram_entropy(), "wall_s": time.time() - t_start,
        "final_train_loss": float(last["loss"]) if last is not None else None,
    })
    if jax.process_index() == 0:
        files.atomic_write(workdir / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def use_compilation_cache(config) -> None:
    """XLA's persistent compilation cache in `compile.cache_dir`, unless one is set already (by
    JAX_COMPILATION_CACHE_DIR in the environment, or a repro's own): a rerun, a resume or a
    sweep's next branch then loads its train step instead of compiling it."""
    directory = config.compile.cache_dir
    if directory and not jax.config.jax_compilation_cache_dir:
        local = "://" not in directory
        jax.config.update("jax_compilation_cache_dir",
                          str(Path(directory).expanduser()) if local else directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          config.compile.cache_min_compile_s)


def run_summary(config, p: phases.Plan) -> dict:
    """What a run is, in the terms of the scaling law (METHOD.md section 3): parameters, tokens
    and FLOPs per phase, bits (16 for a full-precision model), the QAT fraction and S."""
    counts = model.param_count(config)
    flops_per_token = float(model.flops_per_token(config))
    d_fp, d_qat = p.qat_start * p.tokens_per_step, p.qat_steps * p.tokens_per_step
    return {
        "N": counts["total"], "N_nonembed": counts["non_embedding"],
        "tokens": p.total_tokens, "flops": flops_per_token * p.total_tokens,
        "steps": p.total_steps, "bits": p.bits,  # None: full precision
        "B": 16 if p.bits is None else p.bits, "D_fp": d_fp, "D_qat": d_qat,
        "flops_fp": flops_per_token * d_fp, "flops_qat": flops_per_token * d_qat,
        "qat_fraction": p.fraction, "qat_fraction_note": p.fraction_note, "S": p.S,
        "qat_start_step": p.qat_start if p.bits is not None else None, "fused": p.fused,
        "model_bytes": model.served_bytes(config, p.bits)["total"],
    }


def _start_state(setup: Setup, checkpoints, data_iter, branch_from, end: int):
    """(step, state) to start from: this run's newest checkpoint (at or before `end`); else the
    trunk's checkpoint at the branch point; else a fresh initialisation."""
    restored = checkpoints.restore_latest(setup.abstract_state, data_iter, at_most=end)
    if restored:
        metrics.say(f"resumed from the checkpoint at step {restored[0]}")
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
        metrics.say(f"branched off the trunk {trunk_dir} at step {step}")
        return restored
    return 0, setup.init(jax.random.key(setup.config.seed))


def _loop(setup: Setup, state, start: int, end: int, data_iter, val_batches, checkpoints,
          writer, preemption, keep_steps: set[int]):
    """Steps start..end: the switch, log, evaluate, checkpoint. Returns (state, last step's
    metrics, the step SIGTERM stopped at or None)."""
    config, p = setup.config, setup.plan
    lr_fn = optim.lr_schedule(config, p)
    progress = metrics.Progress(end, start)
    losses, t_window, last, warned = [], time.time(), None, False
    try:
        for step in range(start, end):
            if step == p.qat_start:  # the FP -> QAT switch (never reached without QAT)
                state = setup.switch(state)
                progress.message(f"step {step}: FP -> QAT at {p.bits:g} bits (scales set from "
                                 f"the weights; weights' Adam moments "
                                 f"{'reset' if config.qat.reset_moments else 'kept'})")
            # The phase is a function of the step: the FP step before the switch, QAT after.
            train_step = setup.qat_step if step >= p.qat_start else setup.fp_step
            tokens = sharding.shard_batch(next(data_iter), setup.mesh)
            state, last = train_step(state, tokens)
            losses.append(last["loss"])  # device arrays: no host sync until the log step
            done = step + 1
            quantized = p.quantized_after(done)
            if done % config.logging.every_steps == 0 or done == end:
                loss = float(np.mean(jax.device_get(losses)))
                _check_finite(loss, done, checkpoints)
                now = time.time()
                tok_s = len(losses) * p.tokens_per_step / (now - t_window)
                lr = float(lr_fn(step))
                extra = jax.device_get(setup.quant_metrics(state.params)) if quantized else {}
                if not warned and extra.get("dead_scales", 0) > 0:
                    progress.message(_dead_warning(done, extra))
                    warned = True
                writer.write(done, tokens=done * p.tokens_per_step, loss=loss, lr=lr,
                             grad_norm=last["grad_norm"], param_norm=last["param_norm"],
                             tokens_per_s=tok_s, phase=int(quantized), **extra)
                progress.update(done, loss, lr, tok_s)
                losses, t_window = [], now
            if done % config.logging.eval_every_steps == 0 and done < p.total_steps:
                val = setup.evaluate(state.params, val_batches, quantized)
                writer.write(done, val_loss=val, val_ppl=math.exp(val))
                progress.message(f"step {done}: validation loss {val:.4f} "
                                 f"(ppl {math.exp(val):.2f})")
            stop = preemption.reached(done)
            if done % config.checkpoint.every_steps == 0 or done in keep_steps or stop:
                _check_finite(float(last["param_norm"]), done, checkpoints)
                checkpoints.save(done, state, data_iter)
            if stop and done < end:
                return state, last, done
    finally:
        progress.close()
    return state, last, None


def _dead_warning(step: int, health: dict) -> str:
    return (f"warning: step {step}: {int(health['dead_scales'])} quantizer scales "
            f"({100 * float(health['dead_frac']):.1f}%) sit at the floor {quant.SCALE_FLOOR:g}: "
            f"their output channels are dead (every weight clipped, no gradient passes) and "
            f"will not recover. qat.scale_update='relative' (the default) or a lower "
            f"qat.scale_lr_mult keeps scales off the floor (docs/SCALES.md)")


def _check_finite(value: float, step: int, checkpoints: ckpt.Checkpoints):
    """Stop on a non-finite training loss or parameter norm, keeping the checkpoints."""
    if not math.isfinite(value):
        checkpoints.wait()  # a save in flight is a good one: let it land before reporting
        kept = checkpoints.steps()
        raise RunError(f"training diverged (non-finite loss or parameters: {value}) at step "
                       f"{step}; stopped without "
                       f"saving. Last good checkpoint: "
                       f"{f'step {kept[-1]}' if kept else 'none'}. Lower optimizer.peak_lr or "
                       f"raise schedule.warmup_frac")
