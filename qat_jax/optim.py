"""The learning-rate and Adam-beta2 schedules and the optax chain, all read off a Plan
(phases.py: the step boundaries of the FP and QAT phases) and an OptimSpec (the optimizer's
keys, resolved once from the config by resolve.py).

The LR follows warmup-stable-decay: a linear warmup, the stable LR, and cooldowns of
schedule.cooldown_shape (docs/METHOD.md section 6). The optimizer partitions the parameters into
the weights and the quantizers' scales; the scales' gradient is 0 until the switch, and their
step is scaled (scale_lr_factor, and relative to the scale with qat.scale_update='relative').
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from qat_jax.phases import Plan


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """The optimizer and the LR schedule's shape (qat_jax/configs/base.py: optimizer.*, the cooldown
    keys of schedule.*, the scales' and the switch's keys of qat.*), built once by
    resolve.optim_spec."""

    peak_lr: float
    b1: float
    b2: float
    cooldown_b2: float | None  # beta2 in LR cooldowns; None: b2
    eps: float
    weight_decay: float
    grad_clip_norm: float  # 0: no clipping
    grad_accum_steps: int
    cooldown_shape: str  # a name of COOLDOWN_SHAPES
    final_lr_frac: float
    lowered_linear_start: float
    qat_peak_lr: float | None  # unfused QAT's peak LR; None: peak_lr
    reset_moments: bool  # the weights' Adam moments reset at the switch
    scale_update: str  # a name of SCALE_UPDATES
    scale_lr_mult: float
    scale_warmup_frac: float


# Cooldown shapes (Dremov et al., "Training Dynamics of the Cooldown Stage in WSD", METHOD.md
# section 6): the LR factor for progress p in [0, 1) through the cooldown, from the peak (1) down
# to `final` = schedule.final_lr_frac; `c` = schedule.lowered_linear_start.
def _linear(p, final, c):
    return 1.0 - p * (1.0 - final)


def _cosine(p, final, c):
    return final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))


COOLDOWN_SHAPES = {
    "linear": _linear,
    "lowered_linear": lambda p, final, c: c - p * (c - final),  # jumps from 1 to c, then linear
    "cosine": _cosine,
    "mirror_cosine": lambda p, final, c: 2.0 * _linear(p, final, c) - _cosine(p, final, c),
    "square": lambda p, final, c: final + (1.0 - final) * (1.0 - p**2),
    "one_minus_sqrt": lambda p, final, c: final + (1.0 - final) * (1.0 - jnp.sqrt(p)),
    "exp": lambda p, final, c: final**p,  # needs final > 0
}


def lr_schedule(o: OptimSpec, p: Plan) -> optax.Schedule:
    """The LR of update `step`: linear warmup to peak_lr (reached at the last warmup step),
    stable, cooldowns of schedule.cooldown_shape down to final_lr_frac of the peak in effect,
    and for unfused QAT a linear re-warmup from 0 to qat.peak_lr.

    The pieces in step order, joined by optax.join_schedules (each piece gets the steps since
    its start). The warmup wins where the budget's rounding lets a cooldown start inside it:
    every later piece starts at the warmup's end at the earliest, and its progress still counts
    from its own start. Pieces of zero length (the FP cooldown and the re-warmup when fused,
    everything after the FP cooldown for full precision) are never in effect."""
    shape = COOLDOWN_SHAPES[o.cooldown_shape]
    qat_peak = 1.0 if p.fused or o.qat_peak_lr is None else o.qat_peak_lr / o.peak_lr
    final_top = qat_peak if p.cooldown_start >= p.qat_start else 1.0  # the peak it decays from

    def decay(start, end, top):
        return lambda t: top * shape(jnp.clip(t / max(end - start, 1), 0.0, 1.0),
                                     o.final_lr_frac, o.lowered_linear_start)

    pieces = [  # (start step, factor of the steps t since that start)
        (p.warmup_steps, lambda t: 1.0),  # stable
        (p.fp_cooldown_start, decay(p.fp_cooldown_start, p.qat_start, 1.0)),  # unfused FP
        (p.qat_start, lambda t: qat_peak * (t + 1.0) / max(p.qat_warmup_end - p.qat_start, 1)),
        (p.qat_warmup_end, lambda t: qat_peak),  # QAT's stable LR
        (p.cooldown_start, decay(p.cooldown_start, p.total_steps, final_top)),
    ]
    boundaries = [max(start, p.warmup_steps) for start, _ in pieces]

    def from_start(start, boundary, fn):  # t since `start`, for a piece begun at `boundary`
        return lambda t: fn(jnp.asarray(t, jnp.float32) + (boundary - start))

    factor = optax.join_schedules(
        [lambda t: (jnp.asarray(t, jnp.float32) + 1.0) / max(p.warmup_steps, 1)]
        + [from_start(start, b, fn) for (start, fn), b in zip(pieces, boundaries, strict=True)],
        boundaries)
    peak = o.peak_lr
    return lambda step: peak * factor(step)


def b2_schedule(o: OptimSpec, p: Plan) -> optax.Schedule:
    """Adam's beta2 of update `step`: optimizer.cooldown_b2 inside LR cooldowns (the companion
    paper finds a higher beta2 there helps), optimizer.b2 elsewhere."""
    cool = o.b2 if o.cooldown_b2 is None else o.cooldown_b2
    return lambda step: jnp.where(p.in_cooldown(step), cool, o.b2)


DECAYED = ("kernel", "embed", "head")
SCALES = ("quant_scale", "embed_quant_scale", "head_quant_scale")  # the learned scales


def _name(path) -> str | None:
    """The parameter name of a leaf's path (its last dict key; flax boxes add attribute keys)."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return keys[-1] if keys else None


def _decay_mask(params):
    # Decoupled weight decay on weight matrices and the embedding only: not on norm scales, and
    # not on quantizer scales (which are 2-D, hence the match by name rather than by rank).
    return jax.tree_util.tree_map_with_path(lambda path, _: _name(path) in DECAYED, params)


def param_groups(params):
    """'scales' for the quantizers' scales, 'weights' for everything else."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "scales" if _name(path) in SCALES else "weights", params)


SCALE_UPDATES = ("relative", "additive")


def scale_lr_factor(o: OptimSpec, p: Plan) -> optax.Schedule:
    """The scales' LR as a multiple of the weights' at update `step`: qat.scale_lr_mult, ramped
    linearly from 0 over the first qat.scale_warmup_frac of the QAT phase (the scales' Adam
    state is fresh at the switch, so its first updates are full-size whatever the gradient)."""
    ramp = max(round(o.scale_warmup_frac * p.qat_steps), 1)
    return lambda step: o.scale_lr_mult * jnp.clip((step - p.qat_start + 1.0) / ramp, 0.0, 1.0)


def _relative_to_params():
    """Scale each update by its parameter: the step becomes relative, alpha * (1 - lr u),
    to first order the update of Adam on log alpha (our choice, docs/SCALES.md)."""
    return optax.stateless(lambda updates, params: jax.tree.map(jnp.multiply, updates, params))


def make_optimizer(o: OptimSpec, p: Plan, lr: optax.Schedule) -> optax.GradientTransformation:
    """Clip, Adam (beta2 scheduled) per parameter group, decoupled weight decay on the weights,
    the LR schedule `lr` (lr_schedule(o, p), built once by its caller, which logs it).
    The scales get no weight decay; during FP the model does not read them, so their gradient
    is exactly 0 and they do not move; phases.switch_moments gives them fresh Adam state at the
    switch. Their step is scaled by `scale_lr_factor` and, with qat.scale_update='relative', by
    the scale itself: a 6-bit scale of 2e-3 under an LR of 3e-3 would otherwise be pushed
    through its floor by the first Adam step after the switch. The schedules read the global
    update count, which nothing resets."""
    adam = lambda: optax.inject_hyperparams(optax.scale_by_adam)(
        b1=o.b1, b2=b2_schedule(o, p), eps=o.eps)
    relative = o.scale_update == "relative"
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else optax.identity(),
        optax.partition({
            "weights": optax.chain(adam(), optax.add_decayed_weights(o.weight_decay,
                                                                     mask=_decay_mask)),
            "scales": optax.chain(adam(), optax.scale_by_schedule(scale_lr_factor(o, p)),
                                  _relative_to_params() if relative else optax.identity()),
        }, param_groups),
        optax.scale_by_learning_rate(lr),
    )
