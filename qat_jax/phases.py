"""The FP -> QAT policy, in one module: when the switch happens and what it does.

A quantized run trains in full precision first and switches to quantization-aware training for
the last share of its steps (docs/METHOD.md section 1). Everything about that switch is here:

- **how large the QAT share is**: chosen once, at the edge, by qat.fraction_policy
  (resolve.qat_fraction: 'fixed', the number qat.fraction; 'auto', the paper's closed form
  f*(S), section 2; 'law', the optimum of a fitted law, section 3);
- **when** (`plan`, the Plan): the step boundaries of both phases, computed once; the schedules
  (optim.py), the optimizer and the training loop all read it, so the phase is a function of
  the step and a resumed run knows where it is;
- **what it does to the state** (`switch`): every quantizer scale is set from its weight (the
  quantizer's own rule, quant.py), the scales' Adam state starts afresh and the weights' is
  kept or reset (qat.reset_moments).

A run of T steps, steps 0-based, phase ends exclusive:

    FP phase   [0, qat_start)    linear warmup over [0, warmup_steps), then the stable LR;
                                 unfused: its own cooldown over [fp_cooldown_start, qat_start)
    QAT phase  [qat_start, T)    unfused: re-warms from 0 over [qat_start, qat_warmup_end) to
                                 qat.peak_lr; then stable, then the cooldown over
                                 [cooldown_start, T). Fused: starts at the stable LR and the
                                 cooldown happens inside it (the paper's fused cooldown).

A full-precision run has qat_start = T, and its cooldown is [cooldown_start, T). The training
loop (train.py) calls `switch` before update qat_start and steps the quantized model from then on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from qat_jax import qparams, quant, sizes
from qat_jax.errors import ConfigError


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

    def in_cooldown(self, step):
        """Whether update `step` is in an LR cooldown (the FP one when unfused, or the final
        one); works on ints and traced arrays."""
        return (((step >= self.fp_cooldown_start) & (step < self.qat_start))
                | (step >= self.cooldown_start))

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


@dataclasses.dataclass(frozen=True)
class Run:
    """A config resolved once, at the edge (resolve.resolve): the config, every rule of it
    checked, its Plan and its specs. What `train.train` and a sweep's runs are given."""

    config: Any
    plan: Plan
    model: sizes.ModelSpec  # the architecture
    quant: quant.QuantConfig  # the scales
    execution: Any  # model.Execution: how the model executes (dtypes, kernels, remat, scan)
    optim: Any  # optim.OptimSpec: the optimizer and the schedule's shape (optim imports this)
    data: Any  # documents.DataSpec: the corpus, its tokenizer and the batches
    mesh: Any  # sharding.MeshSpec: the device mesh's axis sizes as configured
    loop: LoopSpec  # the training loop's cadences, where it starts from, its caches


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What train.py's loop reads around the steps (resolve.loop_spec builds it from
    checkpoint.*, logging.*, compile.*, seed and model.init_from)."""

    checkpoint_every: int
    max_to_keep: int
    log_every: int
    eval_every: int
    tensorboard: bool
    seed: int  # the parameter initialisation's PRNG seed
    init_from: str  # a Hugging Face Llama directory to start from ('' = a fresh init)
    compile_cache_dir: str  # XLA's persistent compilation cache ('' = off)
    compile_cache_min_s: float


def tokens_per_byte(m: sizes.ModelSpec, q: quant.QuantConfig, total_tokens: int) -> float:
    """S = tokens / the bytes of the served q.bits-bit model `m` (sizes.served_bytes)."""
    return total_tokens / sizes.served_bytes(m, q, q.bits)["total"]


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """What the step boundaries are derived from (resolve.schedule_spec builds it from
    schedule.*, qat's warmup, cooldown and fused keys, the batch and quant.bits)."""

    total_tokens: int
    batch_size: int  # sequences per step, global
    seq_len: int
    warmup_frac: float
    cooldown_frac: float  # a full-precision run's cooldown, and an unfused FP phase's
    qat_warmup_frac: float  # unfused: QAT's re-warmup, a share of its steps
    qat_cooldown_frac: float  # QAT's cooldown, a share of its steps after any warmup
    fused_cooldown: bool
    bits: float | None  # the QAT phase's bit width; None: full precision


def steps(s: ScheduleSpec) -> tuple[int, int]:
    """(tokens per step, steps) of the run's budget; ConfigError below one step."""
    tokens_per_step = s.batch_size * s.seq_len
    T = s.total_tokens // tokens_per_step
    if T < 1:
        raise ConfigError(
            f"schedule.total_tokens={s.total_tokens} is less than one step of "
            f"data.batch_size x model.seq_len = {tokens_per_step} tokens")
    return tokens_per_step, T


def plan(s: ScheduleSpec, fraction: float, note: str, S: float | None) -> Plan:
    """The Plan of a checked schedule whose QAT share `fraction` was chosen by its config's
    qat.fraction_policy (resolve.qat_fraction: `note` says how, S its tokens per served byte).
    Raises ConfigError when the budget cannot hold the phases: those rules need the step
    counts, so they live here."""
    tokens_per_step, T = steps(s)
    warmup = round(s.warmup_frac * T)
    qat_start = T - round(fraction * T)
    if s.bits is not None and fraction > 0 and qat_start == T:
        raise ConfigError(f"the QAT fraction {fraction:.4g} ({note}) rounds to 0 of the {T} "
                          f"steps: raise it (qat.fraction, or qat.min_fraction for 'auto') or "
                          f"schedule.total_tokens")
    quantized = qat_start < T
    fused = s.fused_cooldown or qat_start == 0  # with no FP phase there is nothing to unfuse
    fp_cooldown_start = qat_warmup_end = qat_start
    if not quantized:  # full precision: warmup, stable, cooldown
        cooldown_start = T - round(s.cooldown_frac * T)
    elif fused:  # the cooldown is inside QAT, after any warmup still under way
        cooldown_start = T - round(s.qat_cooldown_frac * (T - max(qat_start, warmup)))
    else:  # the FP phase ends with its own cooldown; QAT re-warms, then decays again
        fp_cooldown_start = qat_start - round(s.cooldown_frac * qat_start)
        qat_warmup_end = qat_start + round(s.qat_warmup_frac * (T - qat_start))
        cooldown_start = T - round(s.qat_cooldown_frac * (T - qat_warmup_end))
        if fp_cooldown_start < warmup:
            raise ConfigError(
                f"unfused cooldown: the FP phase ({qat_start} steps at QAT fraction "
                f"{fraction:.3g}) cannot hold the warmup ({warmup} steps) and its cooldown "
                f"({qat_start - fp_cooldown_start} steps); lower schedule.warmup_frac, "
                f"schedule.cooldown_frac or the QAT fraction")
    return Plan(tokens_per_step, T, warmup, qat_start, fp_cooldown_start, qat_warmup_end,
                cooldown_start, s.bits if quantized else None, fused and quantized,
                (T - qat_start) / T, note, S)


def summary(run: Run) -> dict:
    """What a run is, in the terms of the scaling law (docs/METHOD.md section 3): parameters,
    tokens and FLOPs per phase, bits (16 for a full-precision model), the QAT fraction and S.
    A run's result.json starts with it."""
    p, m, q = run.plan, run.model, run.quant
    counts = sizes.param_count(m, q)
    flops_per_token = float(sizes.flops_per_token(m))
    d_fp, d_qat = p.qat_start * p.tokens_per_step, p.qat_steps * p.tokens_per_step
    return {
        "N": counts["total"], "N_nonembed": counts["non_embedding"],
        "tokens": p.total_tokens, "flops": flops_per_token * p.total_tokens,
        "steps": p.total_steps, "bits": p.bits,  # None: full precision
        "B": 16 if p.bits is None else p.bits, "D_fp": d_fp, "D_qat": d_qat,
        "flops_fp": flops_per_token * d_fp, "flops_qat": flops_per_token * d_qat,
        "qat_fraction": p.fraction, "qat_fraction_note": p.fraction_note, "S": p.S,
        "qat_start_step": p.qat_start if p.bits is not None else None, "fused": p.fused,
        "model_bytes": sizes.served_bytes(m, q, p.bits)["total"],
    }


def switch(state, *, q: quant.QuantConfig, tx: optax.GradientTransformation,
           reset_moments: bool):
    """The FP -> QAT switch of a train state (anything with .params, .opt_state and .replace):
    every quantizer scale set from its weight (qparams.init_scales), then `switch_moments`."""
    params = qparams.init_scales(state.params, q)
    return state.replace(params=params, opt_state=switch_moments(
        tx, state.opt_state, params, reset_weights=reset_moments))


def switch_moments(tx: optax.GradientTransformation, opt_state, params, reset_weights: bool):
    """The optimizer state at the switch: Adam's moments and bias-correction count start afresh
    for the scales (they only start training now) and, when `reset_weights`
    (qat.reset_moments), for the weights too. The hyperparameter schedules' counts are kept:
    they are the global step."""
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
