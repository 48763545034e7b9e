"""The train state, the pure train and eval steps, and a run's phases on its mesh.

`train_step` and `eval_step` are module-level pure functions (tests import them). `Setup` holds
the plan (phases.py), the optimizer (optim.py) and one `Phase` per phase of the run: its model
and the steps jitted with the mesh's shardings; `setup.phase(step)` is the phase of an update.
The loop that steps a state through them is train.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qat_jax import layout, model, optim, phases, qparams, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


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

    mesh: Any
    plan: phases.Plan
    optim: optim.OptimSpec  # what the switch and a divergence's remedy name
    lr: optax.Schedule  # the LR schedule the optimizer steps with (and the log reports)
    tx: optax.GradientTransformation
    abstract_state: Any  # TrainState of jax.ShapeDtypeStruct with target shardings
    init: Any  # rng -> TrainState
    init_from: Any  # params (the loop layout, on the host) -> TrainState
    fp: Phase
    served: Phase

    @classmethod
    def create(cls, run: phases.Run, mesh) -> Setup:
        """The Setup of `run` (a resolved config: resolve.resolve) on `mesh`."""
        p = run.plan
        platform = mesh.devices.flat[0].platform  # the target's, which may not be the host's
        lr = optim.lr_schedule(run.optim, p)
        tx = optim.make_optimizer(run.optim, p, lr)
        cfg = model.ModelConfig.build(run.model, run.quant, run.execution,
                                      platform)  # the served model, built once
        net_fp = model.Decoder(dataclasses.replace(
            cfg, quant=dataclasses.replace(cfg.quant, bits=None)))
        init = functools.partial(init_state, net=net_fp, tx=tx)
        with jax.set_mesh(mesh):
            # the key made inside the trace: nothing runs, even for a mesh of abstract devices
            boxed = jax.eval_shape(lambda: init(jax.random.key(0)))
        state_sh = sharding.logical_shardings(boxed, mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.unbox(boxed), state_sh)
        jitted = _Jitter(run.optim.grad_accum_steps, mesh, tx, state_sh)
        fp = Phase(net_fp, jitted.step(net_fp), jitted.eval(net_fp), enter=lambda state: state,
                   health=lambda params: {})
        served = fp
        if p.bits is not None:
            net_qat = model.Decoder(cfg)
            switch = functools.partial(phases.switch, q=net_qat.cfg.quant, tx=tx,
                                       reset_moments=run.optim.reset_moments)
            served = Phase(net_qat, jitted.step(net_qat), jitted.eval(net_qat),
                           enter=jitted.state_fn(switch),
                           # at log steps only: a fake-quant pass over every weight is not free
                           health=jitted.params_fn(functools.partial(qparams.quant_metrics,
                                                                     q=net_qat.cfg.quant)))
        from_params = jax.jit(lambda params: TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)),
            in_shardings=(state_sh.params,), out_shardings=state_sh)
        return cls(mesh=mesh, plan=p, optim=run.optim, lr=lr, tx=tx, abstract_state=abstract,
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

    grad_accum_steps: int
    mesh: Any
    tx: optax.GradientTransformation
    state_sh: Any  # the TrainState's NamedShardings

    def step(self, net):
        step = functools.partial(train_step, net=net, tx=self.tx,
                                 grad_accum_steps=self.grad_accum_steps,
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
