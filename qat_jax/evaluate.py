"""Evaluation and export of a run's newest checkpoint: validation loss and perplexity of the
model as trained and, for a quantized run, of its full-precision weights side by side."""

from __future__ import annotations

import math

import jax

from qat_jax import ckpt, data, export, sharding, train, validate


def _restore(workdir: str, eval_batches: int | None = None):
    """(config, setup, step, params) of the newest readable checkpoint, on this machine's
    devices (all on the data axis), so a run trained on a pod evaluates on one host."""
    config = train.load_run_config(workdir)
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
        if eval_batches is not None:
            config.data.eval_batches = eval_batches
    validate.check(config)
    mesh = sharding.make_mesh(config)
    setup = train.Setup.create(config, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        restored = ckpt.Checkpoints(workdir, config.checkpoint.max_to_keep).restore_latest(
            setup.abstract_state)
    if restored is None:
        raise train.RunError(f"{workdir} has no checkpoint to evaluate")
    step, state = restored
    return config, setup, step, state.params


def evaluate_workdir(workdir: str, eval_batches: int | None = None) -> dict:
    """Validation loss / perplexity on the run's own held-out split. For a quantized run,
    `val_loss` is the quantized model (as served) and `val_loss_fp` the same weights without
    quantization."""
    config, setup, step, params = _restore(workdir, eval_batches)
    corpus = data.load_corpus(config)
    batches = data.validation_batches(corpus, config)
    out = {"workdir": str(workdir), "step": step, "bits": config.quant.bits}
    fp = None
    if config.quant.bits is not None:  # the same weights through the full-precision model
        fp_config = config.copy_and_resolve_references()
        with fp_config.unlocked():
            fp_config.quant.bits = None
        fp = train.Setup.create(fp_config, setup.mesh)
    with jax.set_mesh(setup.mesh), sharding.axis_rules():
        out["val_loss"] = setup.evaluate(params, batches)
        if fp is not None:
            out["val_loss_fp"] = fp.evaluate(params, batches)
    for key in [k for k in out if k.startswith("val_loss")]:
        out[key.replace("loss", "ppl")] = math.exp(out[key])
    out["val_tokens"] = len(batches) * config.data.batch_size * config.model.seq_len
    return out


def export_workdir(workdir: str, out: str) -> dict:
    """Export the newest checkpoint of a quantized run (see export.py for the format)."""
    config, _, step, params = _restore(workdir)
    sizes = export.export_params(params, config, out)
    return {"step": step, "bits": config.quant.bits, **sizes}
