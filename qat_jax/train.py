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

from qat_jax import ckpt, data, metrics, model, optim, quant, sharding, validate

log = logging.getLogger(__name__)

# Config groups that may change when a run resumes (they do not change its maths).
RESUMABLE_CHANGES = ("checkpoint", "logging", "mesh")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class RunError(RuntimeError):
    """A run that cannot start or go on, with what to do about it."""


def make_model(config) -> model.Decoder:
    return model.Decoder(model.ModelConfig.from_config(config))


def init_state(rng, *, net: model.Decoder, tx: optax.GradientTransformation) -> TrainState:
    """Parameters and optimizer state, boxed with their logical axis names."""
    tokens = jnp.zeros((1, net.cfg.seq_len), jnp.int32)
    params = net.init(rng, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_fn(params, tokens_BL1, *, net: model.Decoder):
    """Mean next-token cross-entropy (nats) of sequences of seq_len + 1 tokens."""
    logits = net.apply({"params": params}, tokens_BL1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BL1[:, 1:]).mean()


def grads_and_loss(params, tokens_BL1, *, net, grad_accum_steps: int):
    """Mean loss and its gradient over a batch, summed over `grad_accum_steps` micro-batches
    (one micro-batch's activations in memory at a time)."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, net=net))
    if grad_accum_steps == 1:
        return grad_fn(params, tokens_BL1)
    # [b, L+1] -> [accum, b / accum, L+1] by taking every accum-th row, so each device's
    # contiguous rows stay on it (a local transpose, no communication).
    micro = tokens_BL1.reshape(-1, grad_accum_steps, tokens_BL1.shape[-1]).swapaxes(0, 1)

    def accumulate(carry, tokens):
        return jax.tree.map(jnp.add, carry, grad_fn(params, tokens)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(accumulate, zeros, micro)
    return jax.tree.map(lambda x: x / grad_accum_steps, total)


def train_step(state: TrainState, tokens_BL1, *, net, tx, grad_accum_steps: int):
    """One optimizer update on a global batch."""
    loss, grads = grads_and_loss(state.params, tokens_BL1, net=net,
                                 grad_accum_steps=grad_accum_steps)
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
    """The model, optimizer and their jitted steps, with the state's shardings on `mesh`."""

    config: Any
    mesh: Any
    net: model.Decoder
    plan: optim.Plan
    tx: optax.GradientTransformation
    abstract_state: Any  # TrainState of jax.ShapeDtypeStruct with target shardings
    init: Any  # rng -> TrainState
    step: Any  # (state, tokens) -> (state, metrics)
    eval: Any  # (params, tokens) -> loss
    quant_metrics: Any  # params -> {clip_frac, quant_err}, or None for full precision

    @classmethod
    def create(cls, config, mesh) -> Setup:
        net = make_model(config)
        p = optim.plan(config)
        tx = optim.make_optimizer(config, p)
        init = functools.partial(init_state, net=net, tx=tx)

        def init_unboxed(rng):
            state = nn.unbox(init(rng))
            if net.cfg.quant.bits is not None:  # quantized from step 0: scales from the weights
                state = state.replace(params=quant.init_scales(state.params, net.cfg.quant))
            return state

        with jax.set_mesh(mesh):
            boxed = jax.eval_shape(init, jax.random.key(0))
        state_sh = sharding.logical_shardings(boxed, mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.unbox(boxed), state_sh)
        batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        step = functools.partial(train_step, net=net, tx=tx,
                                 grad_accum_steps=config.optimizer.grad_accum_steps)
        return cls(
            config=config, mesh=mesh, net=net, plan=p, tx=tx, abstract_state=abstract,
            init=jax.jit(init_unboxed, out_shardings=state_sh),
            # The old state is donated: its buffers are reused for the new one (halves memory).
            step=jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                         donate_argnums=0),
            eval=jax.jit(functools.partial(eval_step, net=net),
                         in_shardings=(state_sh.params, batch_sh), out_shardings=repl),
            # At log steps only: a fake-quant pass over every weight is not free.
            quant_metrics=None if net.cfg.quant.bits is None else jax.jit(
                functools.partial(quant.quant_metrics, q=net.cfg.quant),
                in_shardings=(state_sh.params,), out_shardings=repl),
        )

    def evaluate(self, params, batches) -> float:
        losses = [self.eval(params, sharding.shard_batch(b, self.mesh)) for b in batches]
        return float(np.mean(jax.device_get(losses)))


def load_run_config(workdir: str | Path):
    """The locked config a run in `workdir` was started with (its config.json over base.py's
    keys, so types are base.py's and a stale key is an error)."""
    from configs import base

    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise RunError(f"{workdir} is not a qat-jax run directory (no config.json)")
    config = base.get_config()

    def merge(target, values, prefix=""):
        for key, value in values.items():
            if key not in target:
                raise RunError(f"{path}: unknown key {prefix}{key} (written by another version?)")
            if isinstance(value, dict):
                merge(target[key], value, f"{prefix}{key}.")
            else:
                setattr(target, key, value)

    merge(config, json.loads(path.read_text()))
    config.lock()
    return config


def _check_workdir(workdir: Path, config):
    """Refuse a finished run's workdir, or one whose run used a different config."""
    result = workdir / "result.json"
    if result.exists():
        raise RunError(f"{workdir} holds a finished run ({result}); it is never overwritten: "
                       f"choose a new --workdir, or move that one aside")
    saved = workdir / "config.json"
    if not saved.exists():
        return
    old, new = json.loads(saved.read_text()), json.loads(config.to_json_best_effort())
    diffs = [f"{g}.{k}: {old.get(g, {}).get(k)!r} -> {v!r}" for g, group in new.items()
             if isinstance(group, dict) and g not in RESUMABLE_CHANGES
             for k, v in group.items() if old.get(g, {}).get(k) != v]
    diffs += [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
              if not isinstance(v, dict) and old.get(k) != v]
    if diffs:
        raise RunError(f"{workdir} holds a run with another config; resuming it with this one "
                       f"would mix two runs. Differences: {'; '.join(diffs)}. Use a new --workdir.")


class _Preemption:
    """SIGTERM (preemption) becomes a request the loop acts on between steps: save, then exit.

    On one host our handler sets a flag. On several hosts every host must stop at the same
    step, so JAX's preemption sync point decides (jax.distributed's service catches SIGTERM on
    all hosts); a flag set on one host alone would leave the others waiting in a collective."""

    def __init__(self):
        self.requested = False
        self._multihost = jax.process_count() > 1

    def __enter__(self):
        if not self._multihost:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if not self._multihost:
            signal.signal(signal.SIGTERM, self._old)

    def reached(self, step: int) -> bool:
        if self._multihost:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def train(config, workdir: str | Path) -> dict:
    """Train (or resume) the run of `config` in `workdir`; returns what result.json holds, or
    {'preempted': step} when SIGTERM stopped it after a checkpoint."""
    t_start = time.time()
    workdir = Path(workdir)
    validate.check(config)
    _check_workdir(workdir, config)
    corpus = data.load_corpus(config)  # before compiling: bad data fails fast
    mesh = sharding.make_mesh(config)
    setup = Setup.create(config, mesh)
    p = setup.plan
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    counts = model.param_count(config)
    metrics.say(
        f"workdir: {workdir}\nmodel: {counts['total']:,} parameters "
        f"({counts['non_embedding']:,} non-embedding); "
        f"data: {corpus.description}, {len(corpus.train):,} train / {len(corpus.validation):,} "
        f"validation tokens; plan: {p.total_steps} steps x {p.tokens_per_step:,} tokens; "
        f"mesh {dict(mesh.shape)}")

    checkpoints = ckpt.Checkpoints(workdir, config.checkpoint.max_to_keep)
    data_iter = data.train_iterator(corpus, config)
    val_batches = data.validation_batches(corpus, config)
    writer = metrics.MetricsWriter(workdir, config.logging.tensorboard)
    try:
        with jax.set_mesh(mesh), sharding.axis_rules(), _Preemption() as preemption:
            restored = checkpoints.restore_latest(setup.abstract_state, data_iter)
            if restored:
                start, state = restored
                metrics.say(f"resumed from the checkpoint at step {start}")
            else:
                start, state = 0, setup.init(jax.random.key(config.seed))
            state, last, stopped_at = _loop(setup, state, start, data_iter, val_batches,
                                            checkpoints, writer, preemption)
            if stopped_at is not None:
                checkpoints.wait()
                metrics.say(f"SIGTERM: saved the checkpoint at step {stopped_at}; rerun the "
                            f"same command to resume")
                return {"preempted": stopped_at}
            if p.total_steps not in checkpoints.steps():
                checkpoints.save(p.total_steps, state, data_iter)
            val = setup.evaluate(state.params, val_batches)
            checkpoints.wait()
        writer.write(p.total_steps, val_loss=val, val_ppl=math.exp(val))
    finally:
        checkpoints.close()  # waits for a save in flight, whatever ended the run
        writer.close()
    result = {
        "N": counts["total"], "N_nonembed": counts["non_embedding"],
        "tokens": p.total_tokens, "flops": float(model.flops_per_token(config)) * p.total_tokens,
        "steps": p.total_steps, "bits": config.quant.bits,  # None: full precision
        "val_loss": val, "val_ppl": math.exp(val),
        "unigram_entropy": corpus.unigram_entropy(), "wall_s": time.time() - t_start,
        "final_train_loss": float(last["loss"]) if last is not None else None,
    }
    if jax.process_index() == 0:
        (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _loop(setup: Setup, state, start: int, data_iter, val_batches, checkpoints, writer,
          preemption):
    """Steps start..total: log, evaluate, checkpoint. Returns (state, last step's metrics,
    the step SIGTERM stopped at or None)."""
    config, p = setup.config, setup.plan
    lr_fn = optim.lr_schedule(config, p)
    progress = metrics.Progress(p.total_steps, start)
    losses, t_window, last = [], time.time(), None
    try:
        for step in range(start, p.total_steps):
            tokens = sharding.shard_batch(next(data_iter), setup.mesh)
            state, last = setup.step(state, tokens)
            losses.append(last["loss"])  # device arrays: no host sync until the log step
            done = step + 1
            if done % config.logging.every_steps == 0 or done == p.total_steps:
                loss = float(np.mean(jax.device_get(losses)))
                _check_finite(loss, done, checkpoints)
                now = time.time()
                tok_s = len(losses) * p.tokens_per_step / (now - t_window)
                lr = float(lr_fn(step))
                extra = setup.quant_metrics(state.params) if setup.quant_metrics else {}
                writer.write(done, tokens=done * p.tokens_per_step, loss=loss, lr=lr,
                             grad_norm=last["grad_norm"], param_norm=last["param_norm"],
                             tokens_per_s=tok_s, **extra)
                progress.update(done, loss, lr, tok_s)
                losses, t_window = [], now
            if done % config.logging.eval_every_steps == 0 and done < p.total_steps:
                val = setup.evaluate(state.params, val_batches)
                writer.write(done, val_loss=val, val_ppl=math.exp(val))
                progress.message(f"step {done}: validation loss {val:.4f} "
                                 f"(ppl {math.exp(val):.2f})")
            stop = preemption.reached(done)
            if done % config.checkpoint.every_steps == 0 or stop:
                _check_finite(float(last["param_norm"]), done, checkpoints)
                checkpoints.save(done, state, data_iter)
            if stop and done < p.total_steps:
                return state, last, done
    finally:
        progress.close()
    return state, last, None


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
