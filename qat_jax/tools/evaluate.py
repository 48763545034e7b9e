"""Evaluation and export of a run's newest checkpoint: validation loss and perplexity of the
model as trained and, for a quantized run, of its full-precision weights side by side."""

from __future__ import annotations

import math

import jax

from qat_jax import ckpt, data, runconfig, sharding, train, validate
from qat_jax.tools import export


def restore(workdir: str, eval_batches: int | None = None):
    """(config, setup, step, params) of the newest readable checkpoint, on this machine's
    devices (all on the data axis), so a run trained on a pod evaluates on one host."""
    config = runconfig.load_run_config(workdir)
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
        if eval_batches is not None:
            config.data.eval_batches = eval_batches
    validate.check(config)
    mesh = sharding.make_mesh(config)
    setup = train.Setup.create(config, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        # read-only: evaluating never changes a run (one may be training in it right now)
        saved = ckpt.Checkpoints(workdir, config.checkpoint.max_to_keep, read_only=True)
        try:
            restored = saved.restore_latest(setup.abstract_state)
        finally:
            saved.close()
    if restored is None:
        raise train.RunError(f"{workdir} has no checkpoint to evaluate")
    step, state = restored
    return config, setup, step, state.params


def evaluate_workdir(workdir: str, eval_batches: int | None = None) -> dict:
    """Validation loss / perplexity on the run's own held-out split. Once a run is past its
    FP -> QAT switch, `val_loss` is the quantized model (as served) and `val_loss_fp` the same
    weights without quantization; before it, `val_loss` is the full-precision model."""
    config, setup, step, params = restore(workdir, eval_batches)
    corpus = data.load_corpus(config)
    batches = data.validation_batches(corpus, config)
    quantized = setup.plan.quantized_after(step)
    out = {"workdir": str(workdir), "step": step, "phase": "qat" if quantized else "fp",
           "bits": setup.plan.bits if quantized else None}
    with jax.set_mesh(setup.mesh), sharding.axis_rules():
        out["val_loss"] = setup.evaluate(params, batches, setup.phase_after(step))
        if quantized:
            out["val_loss_fp"] = setup.evaluate(params, batches, setup.fp)
    for key in [k for k in out if k.startswith("val_loss")]:
        out[key.replace("loss", "ppl")] = math.exp(out[key])
    out["val_tokens"] = len(batches) * config.data.batch_size * config.model.seq_len
    return out


def export_workdir(workdir: str, out: str, dtype: str = "bfloat16") -> dict:
    """Export the newest checkpoint of a quantized run (see export.py for the format)."""
    config, setup, step, params = restore(workdir)
    if not setup.plan.quantized_after(step):
        raise ValueError(
            f"{workdir}: a full-precision run has no quantized model to export (quant.bits=None "
            f"or a QAT fraction of 0)" if setup.plan.bits is None else
            f"{workdir}: the newest checkpoint (step {step}) is before the run's FP -> QAT "
            f"switch at step {setup.plan.qat_start}: nothing is quantized yet")
    sizes = export.export_params(params, config, out, dtype)
    return {"step": step, "bits": config.quant.bits, **sizes}


def export_gguf(workdir: str, out: str) -> dict:
    """The newest checkpoint of a quantized run as a llama.cpp GGUF file (gguf_export.py)."""
    from qat_jax.tools import gguf_export

    config, setup, step, params = restore(workdir)
    if not setup.plan.quantized_after(step):
        raise ValueError(f"{workdir}: a full-precision run (or one before its QAT phase) has no "
                         f"quantized model for --format=gguf; --format=hf exports it")
    tokenizer = data.load_corpus(config).tokenizer_path
    written = gguf_export.export(jax.device_get(params), config, out, tokenizer)
    return {"step": step, "bits": config.quant.bits, **written}


def export_hf(workdir: str, out: str, dtype: str = "float32") -> dict:
    """The newest checkpoint of a run as a Hugging Face Llama directory (hf.py): its weights
    as served (quantized once past the switch), their scales, and the run's tokenizer."""
    from qat_jax import hf

    config, setup, step, params = restore(workdir)
    quantized = setup.plan.quantized_after(step)
    tokenizer = data.load_corpus(config).tokenizer_path
    written = hf.export(jax.device_get(params), config, out, quantized, tokenizer, dtype)
    return {"step": step, "bits": config.quant.bits if quantized else None, **written}
