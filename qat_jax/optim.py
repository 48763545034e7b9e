"""The Plan (the run's step boundaries), the learning-rate schedule and the optax chain.

`plan(config)` is computed once from the token budget; the schedule, the optimizer and the
training loop all read it, so a phase is always a function of the step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


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


@dataclasses.dataclass(frozen=True)
class Plan:
    """Step boundaries of a run. Steps are 0-based; phase ends are exclusive."""

    tokens_per_step: int
    total_steps: int
    warmup_steps: int  # steps [0, warmup_steps) warm the LR up linearly
    cooldown_start: int  # steps [cooldown_start, total_steps) decay the LR

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step


def plan(config) -> Plan:
    """The Plan for `config` (raises ValueError naming the key when the budget is too small)."""
    s = config.schedule
    tokens_per_step = config.data.batch_size * config.model.seq_len
    total_steps = s.total_tokens // tokens_per_step
    if total_steps < 1:
        raise ValueError(
            f"schedule.total_tokens={s.total_tokens} is less than one step of "
            f"data.batch_size x model.seq_len = {tokens_per_step} tokens")
    for key in ("warmup_frac", "cooldown_frac"):
        if not 0.0 <= getattr(s, key) <= 1.0:
            raise ValueError(f"schedule.{key}={getattr(s, key)} must be in [0, 1]")
    if s.warmup_frac + s.cooldown_frac > 1.0:
        raise ValueError(f"schedule.warmup_frac + schedule.cooldown_frac = "
                         f"{s.warmup_frac + s.cooldown_frac} exceeds 1")
    if s.cooldown_shape not in COOLDOWN_SHAPES:
        raise ValueError(f"schedule.cooldown_shape={s.cooldown_shape!r} is not one of "
                         f"{sorted(COOLDOWN_SHAPES)}")
    if not 0.0 <= s.final_lr_frac <= 1.0:
        raise ValueError(f"schedule.final_lr_frac={s.final_lr_frac} must be in [0, 1]")
    if s.cooldown_shape == "exp" and s.final_lr_frac <= 0.0:
        raise ValueError("schedule.cooldown_shape='exp' decays as final_lr_frac^p: set "
                         "schedule.final_lr_frac > 0 (e.g. 0.01)")
    if not s.final_lr_frac <= s.lowered_linear_start <= 1.0:
        raise ValueError(f"schedule.lowered_linear_start={s.lowered_linear_start} must be in "
                         f"[final_lr_frac, 1]")
    warmup = round(s.warmup_frac * total_steps)
    cooldown = round(s.cooldown_frac * total_steps)
    return Plan(tokens_per_step, total_steps, warmup, total_steps - cooldown)


def lr_schedule(config, p: Plan) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup to peak_lr (reached at the last warmup step), constant,
    then the cooldown shape down to final_lr_frac x peak_lr."""
    peak, s = config.optimizer.peak_lr, config.schedule
    shape = COOLDOWN_SHAPES[s.cooldown_shape]
    cooldown_steps = max(p.total_steps - p.cooldown_start, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = (step + 1.0) / max(p.warmup_steps, 1)
        progress = jnp.clip((step - p.cooldown_start) / cooldown_steps, 0.0, 1.0)
        factor = jnp.where(step < p.warmup_steps, warm,
                           jnp.where(step < p.cooldown_start, 1.0,
                                     shape(progress, s.final_lr_frac,
                                           s.lowered_linear_start)))
        return peak * factor

    return schedule


DECAYED = ("kernel", "embed")


def _decay_mask(params):
    # Decoupled weight decay on weight matrices and the embedding only: not on norm scales, and
    # not on quantizer scales (which are 2-D, hence the match by name rather than by rank).
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in DECAYED, params)


def make_optimizer(config, p: Plan) -> optax.GradientTransformation:
    o = config.optimizer
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=_decay_mask),
        optax.scale_by_learning_rate(lr_schedule(config, p)),
    )
