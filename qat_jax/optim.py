"""The Plan (a run's phases and step boundaries), the learning-rate and Adam-beta2 schedules, and
the optax chain that carries the FP -> QAT switch.

`plan(config)` is computed once; the schedules, the optimizer and the training loop all read it,
so the phase is always a function of the step and a resumed run knows where it is. A run of T
steps (METHOD.md section 1), steps 0-based, phase ends exclusive:

    FP phase   [0, qat_start)    linear warmup over [0, warmup_steps), then the stable LR;
                                 unfused: its own cooldown over [fp_cooldown_start, qat_start)
    QAT phase  [qat_start, T)    unfused: re-warms from 0 over [qat_start, qat_warmup_end) to
                                 qat.peak_lr; then stable, then the cooldown over
                                 [cooldown_start, T). Fused: starts at the stable LR and the
                                 cooldown happens inside it (the paper's fused cooldown).

A full-precision run has qat_start = T, and its cooldown is [cooldown_start, T).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from qat_jax import law, model, planner


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
    """Step boundaries of a run and the facts they were derived from."""

    tokens_per_step: int
    total_steps: int
    warmup_steps: int  # [0, warmup_steps) warms the LR up linearly
    qat_start: int  # the first QAT step; total_steps when nothing is quantized
    fp_cooldown_start: int  # unfused: the FP phase's own cooldown; else = qat_start (none)
    qat_warmup_end: int  # unfused: QAT re-warms over [qat_start, qat_warmup_end); else qat_start
    cooldown_start: int  # the final cooldown is [cooldown_start, total_steps)
    bits: float | None  # the QAT phase's bit width; None: no QAT phase
    fused: bool  # the cooldown happens inside the QAT phase (False for full precision)
    fraction: float  # the realised QAT share of the steps, (total - qat_start) / total
    fraction_note: str  # where the fraction came from, for people
    S: float | None  # tokens per byte of the served model at `bits` (tokens_per_byte)

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step

    @property
    def qat_steps(self) -> int:
        return self.total_steps - self.qat_start

    @property
    def trunk_end(self) -> int:
        """The first step at which this run departs from the shared warmup-stable FP trunk
        (its LR or its phase differ from then on): where a sweep branches it off."""
        return min(self.fp_cooldown_start, self.qat_start, self.cooldown_start)

    def quantized_after(self, steps_done: int) -> bool:
        """Whether the state after `steps_done` updates has been through the switch (which runs
        before update `qat_start`)."""
        return self.bits is not None and steps_done > self.qat_start

    def describe(self) -> str:
        T = self.total_steps
        text = f"{T} steps x {self.tokens_per_step:,} tokens, warmup {self.warmup_steps}"
        if self.bits is None:
            return text + f", cooldown from step {self.cooldown_start} (full precision)"
        fp = f"FP steps 0-{self.qat_start - 1}" if self.qat_start else "no FP phase"
        text += (f"; {fp}, QAT at {self.bits:g} bits from step {self.qat_start} (fraction "
                 f"{self.fraction:.3f}, {self.fraction_note})")
        if self.fused:
            return text + f"; fused cooldown from step {self.cooldown_start}"
        return text + (f"; unfused: FP cooldown from step {self.fp_cooldown_start}, QAT "
                       f"re-warmup to step {self.qat_warmup_end}, cooldown from step "
                       f"{self.cooldown_start}")


def tokens_per_byte(config, total_tokens: int) -> float:
    """S = tokens / the bytes of the served B-bit model (model.served_bytes)."""
    return total_tokens / model.served_bytes(config, config.quant.bits)["total"]


def qat_fraction(config, total_tokens: int) -> tuple[float, str, float | None]:
    """(fraction, how it was chosen, S) for `config.qat.fraction`: a number; 'auto', the
    paper's f*(S) = exp(-a / ln S) floored at qat.min_fraction (which also stands in where
    S <= 1 and f* is undefined); or 'law', the optimum of the fitted law in qat.law_file.
    Full precision: (0, ..., None)."""
    a, bits = config.qat, config.quant.bits
    if a.fraction == "law" and not a.law_file:
        raise ValueError("qat.fraction='law' needs qat.law_file (a law.json of `qat-jax fit`)")
    if a.fraction not in ("auto", "law"):
        try:
            f = float(a.fraction)
        except ValueError:
            f = -1.0
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"qat.fraction={a.fraction!r}; valid: a number in [0, 1], 'auto' "
                             f"(f*(S) = exp(-{law.CLOSED_FORM_A} / ln S), METHOD.md section 2) "
                             f"or 'law' (the optimum of qat.law_file)")
    if bits is None:
        return 0.0, "full precision", None
    S = tokens_per_byte(config, total_tokens)
    if a.fraction == "law":
        try:
            fitted = law.load_law(a.law_file)
        except law.LawError as e:
            raise ValueError(f"qat.law_file: {e}") from None
        f, loss = planner.optimal_fraction(fitted, model.param_count(config)["total"],
                                           total_tokens, bits, total_tokens / S)
        return f, f"law: optimum of {a.law_file} (predicted loss {loss:.4f})", S
    if a.fraction != "auto":
        return f, "given", S
    try:
        f = law.closed_form_fraction(S)
    except ValueError:
        return a.min_fraction, (f"auto: f*(S) is undefined at S = {S:.3g} <= 1, so "
                                f"qat.min_fraction"), S
    if f < a.min_fraction:
        return a.min_fraction, (f"auto: f*(S) = {f:.3g} at S = {S:.3g}, raised to "
                                f"qat.min_fraction"), S
    return f, f"auto: f*(S) at S = {S:.3g}", S


def _check_keys(config):
    s, a, o = config.schedule, config.qat, config.optimizer
    for key in ("schedule.warmup_frac", "schedule.cooldown_frac", "schedule.final_lr_frac",
                "qat.min_fraction", "qat.cooldown_frac", "qat.warmup_frac",
                "qat.scale_warmup_frac"):
        group, name = key.split(".")
        value = getattr(getattr(config, group), name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key}={value} must be in [0, 1]")
    if s.warmup_frac + s.cooldown_frac > 1.0:
        raise ValueError(f"schedule.warmup_frac + schedule.cooldown_frac = "
                         f"{s.warmup_frac + s.cooldown_frac} exceeds 1")
    if s.cooldown_shape not in COOLDOWN_SHAPES:
        raise ValueError(f"schedule.cooldown_shape={s.cooldown_shape!r} is not one of "
                         f"{sorted(COOLDOWN_SHAPES)}")
    if s.cooldown_shape == "exp" and s.final_lr_frac <= 0.0:
        raise ValueError("schedule.cooldown_shape='exp' decays as final_lr_frac^p: set "
                         "schedule.final_lr_frac > 0 (e.g. 0.01)")
    if not s.final_lr_frac <= s.lowered_linear_start <= 1.0:
        raise ValueError(f"schedule.lowered_linear_start={s.lowered_linear_start} must be in "
                         f"[final_lr_frac, 1]")
    if a.peak_lr is not None and (a.fused_cooldown or a.peak_lr <= 0):
        raise ValueError(f"qat.peak_lr={a.peak_lr} is the peak of the unfused QAT re-warmup: it "
                         f"needs qat.fused_cooldown=False and a positive value (None = "
                         f"optimizer.peak_lr)")
    if a.scale_update not in SCALE_UPDATES:
        raise ValueError(f"qat.scale_update={a.scale_update!r}; valid: {SCALE_UPDATES}")
    if not a.scale_lr_mult > 0:
        raise ValueError(f"qat.scale_lr_mult={a.scale_lr_mult} must be positive")
    if o.cooldown_b2 is not None and not 0.0 <= o.cooldown_b2 < 1.0:
        raise ValueError(f"optimizer.cooldown_b2={o.cooldown_b2} must be in [0, 1)")


def plan(config) -> Plan:
    """The Plan for `config` (raises ValueError naming the key when a value is invalid or the
    budget cannot hold the phases)."""
    s, a = config.schedule, config.qat
    tokens_per_step = config.data.batch_size * config.model.seq_len
    T = s.total_tokens // tokens_per_step
    if T < 1:
        raise ValueError(
            f"schedule.total_tokens={s.total_tokens} is less than one step of "
            f"data.batch_size x model.seq_len = {tokens_per_step} tokens")
    _check_keys(config)
    warmup = round(s.warmup_frac * T)
    fraction, note, S = qat_fraction(config, T * tokens_per_step)
    qat_start = T - round(fraction * T)
    if config.quant.bits is not None and fraction > 0 and qat_start == T:
        raise ValueError(f"qat.fraction={fraction:.4g} ({note}) rounds to 0 of the {T} steps: "
                         f"raise qat.fraction or schedule.total_tokens")
    quantized = qat_start < T
    fused = a.fused_cooldown or qat_start == 0  # with no FP phase there is nothing to unfuse
    fp_cooldown_start = qat_warmup_end = qat_start
    if not quantized:  # full precision: warmup, stable, cooldown
        cooldown_start = T - round(s.cooldown_frac * T)
    elif fused:  # the cooldown is inside QAT, after any warmup still under way
        cooldown_start = T - round(a.cooldown_frac * (T - max(qat_start, warmup)))
    else:  # the FP phase ends with its own cooldown; QAT re-warms, then decays again
        fp_cooldown_start = qat_start - round(s.cooldown_frac * qat_start)
        qat_warmup_end = qat_start + round(a.warmup_frac * (T - qat_start))
        cooldown_start = T - round(a.cooldown_frac * (T - qat_warmup_end))
        if fp_cooldown_start < warmup:
            raise ValueError(
                f"unfused cooldown: the FP phase ({qat_start} steps at qat.fraction="
                f"{fraction:.3g}) cannot hold the warmup ({warmup} steps) and its cooldown "
                f"({qat_start - fp_cooldown_start} steps); lower schedule.warmup_frac, "
                f"schedule.cooldown_frac or qat.fraction")
    return Plan(tokens_per_step, T, warmup, qat_start, fp_cooldown_start, qat_warmup_end,
                cooldown_start, config.quant.bits if quantized else None, fused and quantized,
                (T - qat_start) / T, note, S)


def in_cooldown(p: Plan, step):
    """Whether update `step` is in an LR cooldown (the FP one when unfused, or the final one)."""
    return ((step >= p.fp_cooldown_start) & (step < p.qat_start)) | (step >= p.cooldown_start)


def lr_schedule(config, p: Plan) -> optax.Schedule:
    """The LR of update `step`: linear warmup to peak_lr (reached at the last warmup step),
    stable, cooldowns of schedule.cooldown_shape down to final_lr_frac of the peak in effect,
    and for unfused QAT a linear re-warmup from 0 to qat.peak_lr."""
    peak, s = config.optimizer.peak_lr, config.schedule
    shape = COOLDOWN_SHAPES[s.cooldown_shape]
    qat_peak = 1.0 if p.fused or config.qat.peak_lr is None else config.qat.peak_lr / peak

    def decay(step, start, end, top):
        progress = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
        return top * shape(progress, s.final_lr_frac, s.lowered_linear_start)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        top = jnp.where(step >= p.qat_start, qat_peak, 1.0)  # the stable LR of each phase
        factor = jnp.where(step >= p.cooldown_start,
                           decay(step, p.cooldown_start, p.total_steps, top), top)
        rewarm = qat_peak * (step - p.qat_start + 1.0) / max(p.qat_warmup_end - p.qat_start, 1)
        factor = jnp.where((step >= p.qat_start) & (step < p.qat_warmup_end), rewarm, factor)
        factor = jnp.where((step >= p.fp_cooldown_start) & (step < p.qat_start),
                           decay(step, p.fp_cooldown_start, p.qat_start, 1.0), factor)
        factor = jnp.where(step < p.warmup_steps, (step + 1.0) / max(p.warmup_steps, 1), factor)
        return peak * factor

    return schedule


def b2_schedule(config, p: Plan) -> optax.Schedule:
    """Adam's beta2 of update `step`: optimizer.cooldown_b2 inside LR cooldowns (the companion
    paper finds a higher beta2 there helps), optimizer.b2 elsewhere."""
    o = config.optimizer
    cool = o.b2 if o.cooldown_b2 is None else o.cooldown_b2
    return lambda step: jnp.where(in_cooldown(p, step), cool, o.b2)


DECAYED = ("kernel", "embed")
SCALES = ("quant_scale", "embed_quant_scale")  # the quantizers' learned scales


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


def scale_lr_factor(config, p: Plan) -> optax.Schedule:
    """The scales' LR as a multiple of the weights' at update `step`: qat.scale_lr_mult, ramped
    linearly from 0 over the first qat.scale_warmup_frac of the QAT phase (the scales' Adam
    state is fresh at the switch, so its first updates are full-size whatever the gradient)."""
    a = config.qat
    ramp = max(round(a.scale_warmup_frac * p.qat_steps), 1)
    return lambda step: a.scale_lr_mult * jnp.clip((step - p.qat_start + 1.0) / ramp, 0.0, 1.0)


def _relative_to_params():
    """Scale each update by its parameter: the step becomes relative, alpha * (1 - lr u),
    to first order the update of Adam on log alpha (our choice, docs/SCALES.md)."""
    return optax.stateless(lambda updates, params: jax.tree.map(jnp.multiply, updates, params))


def make_optimizer(config, p: Plan) -> optax.GradientTransformation:
    """Clip, Adam (beta2 scheduled) per parameter group, decoupled weight decay on the weights,
    the LR schedule. The scales get no weight decay; during FP the model does not read them, so
    their gradient is exactly 0 and they do not move; `switch_moments` gives them fresh Adam
    state at the switch. Their step is scaled by `scale_lr_factor` and, with
    qat.scale_update='relative', by the scale itself: a 6-bit scale of 2e-3 under an LR of 3e-3
    would otherwise be pushed through its floor by the first Adam step after the switch.
    The schedules read the global update count, which nothing resets."""
    o, a = config.optimizer, config.qat
    adam = lambda: optax.inject_hyperparams(optax.scale_by_adam)(
        b1=o.b1, b2=b2_schedule(config, p), eps=o.eps)
    relative = a.scale_update == "relative"
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else optax.identity(),
        optax.partition({
            "weights": optax.chain(adam(), optax.add_decayed_weights(o.weight_decay,
                                                                     mask=_decay_mask)),
            "scales": optax.chain(adam(), optax.scale_by_schedule(scale_lr_factor(config, p)),
                                  _relative_to_params() if relative else optax.identity()),
        }, param_groups),
        optax.scale_by_learning_rate(lr_schedule(config, p)),
    )


def switch_moments(tx: optax.GradientTransformation, opt_state, params, reset_weights: bool):
    """The optimizer state at the FP -> QAT switch (METHOD.md section 1): Adam's moments and
    bias-correction count start afresh for the scales (they only start training now) and, when
    `reset_weights` (qat.reset_moments), for the weights too. The hyperparameter schedules'
    counts are kept: they are the global step."""
    fresh = tx.init(params)
    groups = ("scales", "weights") if reset_weights else ("scales",)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    out = []
    for old, new in zip(opt_state, fresh, strict=True):  # the chain's states
        if isinstance(old, optax.transforms.PartitionState):
            inner = dict(old.inner_states)
            for g in groups:
                inner[g] = jax.tree.map(lambda o, n: n if is_adam(o) else o, inner[g],
                                        new.inner_states[g], is_leaf=is_adam)
            old = old._replace(inner_states=inner)
        out.append(old)
    return tuple(out)
