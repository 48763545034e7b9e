"""A config resolved once, at the edge: the one place that checks a config's keys and chooses
its QAT fraction, before anything compiles.

`resolve` runs every rule, group by group (model, optimizer, data, mesh, quant, schedule, qat),
raises ConfigError naming the key, its value and what would be valid, and returns the Run (the
config and its Plan) that train, a sweep's runs and the tools are given. The fraction policy
(`qat_fraction`: 'fixed', 'auto' or 'law') runs here and only here, so the training modules
below never load a law. Three kinds of rule are raised where the value they need is computed,
still before compilation and without any re-wrapping: the step counts of the plan
(phases.plan: a phase too short to hold its warmup),
the mesh's axis sizes on the devices (sharding.mesh_shape), and the target platform's
attention kernel (attention.resolve). Rules that need the corpus (is it large enough for one
batch?) live in data.py and run right after the corpus is loaded.
"""

from __future__ import annotations

import math

import jax

from qat_jax import (
    attention,
    documents,
    errors,
    kernels,
    law,
    model,
    optim,
    phases,
    quant,
    sharding,
    sizes,
)
from qat_jax.law import planner

ConfigError = errors.ConfigError  # the error of this module, where every check raises it


def _require(cond: bool, message: str):
    if not cond:
        raise ConfigError(message)


def _positive(config, *keys):
    for key in keys:
        group, name = key.split(".")
        value = getattr(getattr(config, group), name)
        _require(value > 0, f"{key}={value} must be positive")


FRACTION_POLICIES = ("fixed", "auto", "law")


def resolve(config, n_devices: int | None = None, n_processes: int | None = None,
            needs_data: bool = True) -> phases.Run:
    """Raise ConfigError for the first inconsistent key of `config` on this machine; else the
    Run: the config and its Plan, which the rules need (computed once here: the caller passes
    the Run on, to train or trainstep.Setup). `needs_data=False` (qat-jax compile, which reads
    no data) skips the data source's path."""
    n_devices = jax.device_count() if n_devices is None else n_devices
    n_processes = jax.process_count() if n_processes is None else n_processes
    _check_finite(config)
    _positive(config, "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
              "model.n_kv_heads", "model.d_ff", "model.seq_len", "model.rope_theta",
              "model.norm_eps", "model.init_std", "optimizer.peak_lr", "optimizer.eps",
              "optimizer.grad_accum_steps", "data.batch_size", "data.eval_batches",
              "checkpoint.every_steps", "checkpoint.max_to_keep", "logging.every_steps",
              "logging.eval_every_steps", "schedule.total_tokens")
    _check_model(config.model)
    _require(config.compile.cache_min_compile_s >= 0,
             f"compile.cache_min_compile_s={config.compile.cache_min_compile_s} must be >= 0")
    _check_optimizer(config.optimizer)
    _check_data(config.data, needs_data)
    _check_mesh(config, n_devices, n_processes)
    _check_quant(config.quant, config.model)
    _check_schedule(config.schedule)
    _check_qat(config.qat, config.optimizer)
    # the rules that need the step counts (a phase too short) run as the plan is made
    return planned(config)


def planned(config) -> phases.Run:
    """The Run of `config` with its rules unchecked: for a config checked already (against
    other devices: qat-jax compile) and for tests."""
    m, q = sizes.specs(config)  # built once: the plan and the run share them
    return phases.Run(config, plan(config, m, q), m, q, model.Execution.from_config(config),
                      optim_spec(config), data_spec(config), mesh_spec(config),
                      loop_spec(config))


def loop_spec(config) -> phases.LoopSpec:
    """The training loop's keys of `config` (checkpoint.*, logging.*, compile.*, seed,
    model.init_from)."""
    ck, lg, cp = config.checkpoint, config.logging, config.compile
    return phases.LoopSpec(
        checkpoint_every=ck.every_steps, max_to_keep=ck.max_to_keep, log_every=lg.every_steps,
        eval_every=lg.eval_every_steps, tensorboard=lg.tensorboard, seed=config.seed,
        init_from=config.model.init_from, compile_cache_dir=cp.cache_dir,
        compile_cache_min_s=cp.cache_min_compile_s)


def mesh_spec(config) -> sharding.MeshSpec:
    """The mesh's keys of `config` (mesh.*)."""
    return sharding.MeshSpec(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def data_spec(config) -> documents.DataSpec:
    """The data pipeline's keys of `config` (data.*, and the model's seq_len and vocab_size)."""
    d, m = config.data, config.model
    return documents.DataSpec(
        source=d.source, path=d.path, text_key=d.text_key, tfds_data_dir=d.tfds_data_dir,
        tokenizer=d.tokenizer, val_every_nth_doc=d.val_every_nth_doc,
        batch_size=d.batch_size, seed=d.seed, cache_dir=d.cache_dir,
        eval_batches=d.eval_batches, seq_len=m.seq_len, vocab_size=m.vocab_size)


def optim_spec(config) -> optim.OptimSpec:
    """The optimizer's keys of `config` (optimizer.*, schedule's cooldown shape, qat's scale
    and switch keys) as the spec optim.py reads."""
    o, s, a = config.optimizer, config.schedule, config.qat
    return optim.OptimSpec(
        peak_lr=o.peak_lr, b1=o.b1, b2=o.b2, cooldown_b2=o.cooldown_b2, eps=o.eps,
        weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm,
        grad_accum_steps=o.grad_accum_steps, cooldown_shape=s.cooldown_shape,
        final_lr_frac=s.final_lr_frac, lowered_linear_start=s.lowered_linear_start,
        qat_peak_lr=a.peak_lr, reset_moments=a.reset_moments, scale_update=a.scale_update,
        scale_lr_mult=a.scale_lr_mult, scale_warmup_frac=a.scale_warmup_frac)


def plan(config, m: sizes.ModelSpec | None = None,
         q: quant.QuantConfig | None = None) -> phases.Plan:
    """The Plan of `config` (its rules unchecked: `resolve` checks them first), its QAT
    fraction chosen by qat.fraction_policy (`qat_fraction`); m and q: its specs, where the
    caller has them."""
    spec = schedule_spec(config)
    tokens_per_step, T = phases.steps(spec)
    return phases.plan(spec, *qat_fraction(config, T * tokens_per_step, m, q))


def schedule_spec(config) -> phases.ScheduleSpec:
    """The keys the step boundaries are derived from (phases.plan)."""
    s, a = config.schedule, config.qat
    return phases.ScheduleSpec(
        total_tokens=s.total_tokens, batch_size=config.data.batch_size,
        seq_len=config.model.seq_len, warmup_frac=s.warmup_frac, cooldown_frac=s.cooldown_frac,
        qat_warmup_frac=a.warmup_frac, qat_cooldown_frac=a.cooldown_frac,
        fused_cooldown=a.fused_cooldown, bits=config.quant.bits)


def qat_fraction(config, total_tokens: int, m: sizes.ModelSpec | None = None,
                 q: quant.QuantConfig | None = None) -> tuple[float, str, float | None]:
    """(fraction, how it was chosen, S) by qat.fraction_policy: 'fixed', the number
    qat.fraction; 'auto', the paper's f*(S) = exp(-a / ln S) floored at qat.min_fraction (which
    also stands in where S <= 1 and f* is undefined); 'law', the optimum of the fitted law in
    qat.law_file. Full precision: (0, ..., None). The keys' values are checked by `resolve`."""
    a, bits = config.qat, config.quant.bits
    if bits is None:
        return 0.0, "full precision", None
    if m is None or q is None:
        m, q = sizes.specs(config)
    S = phases.tokens_per_byte(m, q, total_tokens)
    if a.fraction_policy == "fixed":
        return float(a.fraction), "fixed", S
    if a.fraction_policy == "law":
        try:
            fitted = law.load_law(a.law_file)
        except law.LawError as e:
            raise ConfigError(f"qat.law_file: {e}") from None
        N = sizes.param_count(m, q)["total"]
        f, loss = planner.optimal_fraction(fitted, N, total_tokens, bits, total_tokens / S)
        doubts = planner.doubts(fitted, N, total_tokens, bits, f, loss)
        if doubts:
            far = planner.extrapolation(fitted, N, total_tokens)
            raise ConfigError(
                f"qat.law_file: {a.law_file}'s plan for this run (N = {N:,} parameters, "
                f"{total_tokens:,} tokens, {bits:g} bits) means nothing: {'; '.join(doubts)}"
                f"{f' ({far})' if far else ''}. Use qat.fraction_policy='auto' (the paper's "
                f"closed form) or 'fixed' with qat.fraction, or a law fitted to runs nearer "
                f"this model and budget")
        return f, f"law: optimum of {a.law_file} (predicted loss {loss:.4f})", S
    try:
        f = law.closed_form_fraction(S)
    except ValueError:
        return a.min_fraction, (f"auto: f*(S) is undefined at S = {S:.3g} <= 1, so "
                                f"qat.min_fraction"), S
    if f < a.min_fraction:
        return a.min_fraction, (f"auto: f*(S) = {f:.3g} at S = {S:.3g}, raised to "
                                f"qat.min_fraction"), S
    return f, f"auto: f*(S) at S = {S:.3g}", S


def _check_finite(config):
    """Every number of the config is finite: a NaN or infinite value (optimizer.peak_lr=inf,
    a weight decay of nan) would only show as a diverged run after the compile."""
    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            elif isinstance(v, float):
                yield f"{prefix}{k}", v

    for key, value in walk(config.to_dict(), ""):
        _require(math.isfinite(value), f"{key}={value} must be a finite number")


def _check_model(m):
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _require(m.n_heads % m.n_kv_heads == 0,
             f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    _require((m.d_model // m.n_heads) % 2 == 0,
             f"head dim model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even "
             f"(RoPE rotates pairs of dimensions)")
    _require(m.compute_dtype in ("auto", "float32", "bfloat16"),
             f"model.compute_dtype={m.compute_dtype!r}; valid: 'auto', 'float32', 'bfloat16'")
    _require(m.matmul_precision in kernels.MATMUL_PRECISIONS,
             f"model.matmul_precision={m.matmul_precision!r}; valid: {kernels.MATMUL_PRECISIONS}")
    attention.check_name(m.attention)
    _require(m.attention_block > 0 and m.attention_block % 128 == 0,
             f"model.attention_block={m.attention_block} must be a positive multiple of 128 "
             f"(the TPU kernel's lane width)")
    _require(m.remat_policy in model.REMAT_POLICIES,
             f"model.remat_policy={m.remat_policy!r}; valid: {list(model.REMAT_POLICIES)}")
    _require(m.loss_chunk_len >= 0 and (m.loss_chunk_len == 0 or
                                        m.seq_len % m.loss_chunk_len == 0),
             f"model.loss_chunk_len={m.loss_chunk_len} must be 0 (off) or divide "
             f"model.seq_len={m.seq_len}")


def _check_optimizer(o):
    for key in ("b1", "b2"):
        value = getattr(o, key)
        _require(0.0 <= value < 1.0, f"optimizer.{key}={value} must be in [0, 1)")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    _require(o.grad_clip_norm >= 0, f"optimizer.grad_clip_norm={o.grad_clip_norm} must be >= 0 "
             f"(0 disables clipping)")


def _check_data(d, needs_data: bool):
    documents.check_source(d.source)
    _require(d.source == "bible" or bool(d.path) or not needs_data,
             f"data.source={d.source!r} needs data.path (a glob for 'files', a dataset name for "
             f"'tfds', a `qat-jax prepare` directory for 'array_record')")
    _require(bool(d.cache_dir.strip()),
             "data.cache_dir='' would cache tokenizers and token files in the current "
             "directory; give a directory (default ~/.cache/qat_jax)")
    _require(d.val_every_nth_doc >= 2,
             f"data.val_every_nth_doc={d.val_every_nth_doc} must be >= 2 (1 would hold out "
             f"every document)")


def _check_mesh(config, n_devices: int, n_processes: int):
    """The mesh fits the devices, and the batch, heads, d_ff, vocabulary and d_model split
    over it."""
    shape = sharding.mesh_shape(mesh_spec(config), n_devices)
    m, o, d = config.model, config.optimizer, config.data
    dp = shape["data"] * shape["fsdp"]
    _require(d.batch_size % dp == 0,
             f"data.batch_size={d.batch_size} is not divisible by the {dp} data-parallel devices "
             f"(mesh.data x mesh.fsdp = {shape['data']} x {shape['fsdp']})")
    _require(d.batch_size % n_processes == 0,
             f"data.batch_size={d.batch_size} is not divisible by the {n_processes} hosts")
    per_device = d.batch_size // dp
    _require(per_device % o.grad_accum_steps == 0,
             f"optimizer.grad_accum_steps={o.grad_accum_steps} must divide the per-device batch "
             f"data.batch_size / {dp} devices = {per_device}")
    tp = shape["tensor"]
    for key, size in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
                      ("model.d_ff", m.d_ff), ("model.vocab_size", m.vocab_size)):
        _require(size % tp == 0, f"{key}={size} is not divisible by mesh.tensor={tp}")
    _require(m.d_model % shape["fsdp"] == 0,
             f"model.d_model={m.d_model} is not divisible by mesh.fsdp={shape['fsdp']}")


def _unit_interval(prefix: str, group, *names):
    for name in names:
        value = getattr(group, name)
        _require(0.0 <= value <= 1.0, f"{prefix}.{name}={value} must be in [0, 1]")


def _check_quant(q, m):
    if q.bits is not None:
        quant.check_bits(q.bits)
    # Scales exist in every config (FP too), so their shape must be valid even when bits=None.
    quant.check_scales(q.granularity, q.group_size,
                       {"model.d_model": m.d_model, "model.d_ff": m.d_ff})
    _require(q.scale_dtype in quant.SCALE_DTYPES,
             f"quant.scale_dtype={q.scale_dtype!r}; valid: {quant.SCALE_DTYPES}")


def _check_schedule(s):
    _unit_interval("schedule", s, "warmup_frac", "cooldown_frac", "final_lr_frac")
    _require(s.warmup_frac + s.cooldown_frac <= 1.0,
             f"schedule.warmup_frac + schedule.cooldown_frac = "
             f"{s.warmup_frac + s.cooldown_frac} exceeds 1")
    _require(s.cooldown_shape in optim.COOLDOWN_SHAPES,
             f"schedule.cooldown_shape={s.cooldown_shape!r} is not one of "
             f"{sorted(optim.COOLDOWN_SHAPES)}")
    _require(s.cooldown_shape != "exp" or s.final_lr_frac > 0.0,
             "schedule.cooldown_shape='exp' decays as final_lr_frac^p: set "
             "schedule.final_lr_frac > 0 (e.g. 0.01)")
    _require(s.final_lr_frac <= s.lowered_linear_start <= 1.0,
             f"schedule.lowered_linear_start={s.lowered_linear_start} must be in "
             f"[final_lr_frac, 1]")


def _check_qat(a, o):
    _require(a.fraction_policy in FRACTION_POLICIES,
             f"qat.fraction_policy={a.fraction_policy!r}; valid: 'fixed' (the number "
             f"qat.fraction), 'auto' (f*(S) = exp(-{law.CLOSED_FORM_A} / ln S), docs/METHOD.md "
             f"section 2) or 'law' (the optimum of qat.law_file)")
    if a.fraction_policy == "fixed":
        _require(a.fraction is not None and 0.0 <= a.fraction <= 1.0,
                 f"qat.fraction={a.fraction!r}: qat.fraction_policy='fixed' needs a number in "
                 f"[0, 1]")
    else:
        _require(a.fraction is None,
                 f"qat.fraction={a.fraction!r} is read only with qat.fraction_policy='fixed' "
                 f"(it is {a.fraction_policy!r}): add --config.qat.fraction_policy=fixed, or "
                 f"drop qat.fraction")
    _require(a.fraction_policy != "law" or bool(a.law_file),
             "qat.fraction_policy='law' needs qat.law_file (a law.json of `qat-jax fit`)")
    _unit_interval("qat", a, "min_fraction", "cooldown_frac", "warmup_frac", "scale_warmup_frac")
    _require(a.peak_lr is None or (not a.fused_cooldown and a.peak_lr > 0),
             f"qat.peak_lr={a.peak_lr} is the peak of the unfused QAT re-warmup: it needs "
             f"qat.fused_cooldown=False and a positive value (None = optimizer.peak_lr)")
    _require(a.scale_update in optim.SCALE_UPDATES,
             f"qat.scale_update={a.scale_update!r}; valid: {optim.SCALE_UPDATES}")
    _require(a.scale_lr_mult > 0, f"qat.scale_lr_mult={a.scale_lr_mult} must be positive")
    _require(o.cooldown_b2 is None or 0.0 <= o.cooldown_b2 < 1.0,
             f"optimizer.cooldown_b2={o.cooldown_b2} must be in [0, 1)")
