"""Evaluation of a run's latest checkpoint: validation loss and perplexity."""

from __future__ import annotations

import math

import jax

from qat_jax import ckpt, data, sharding, train, validate


def evaluate_workdir(workdir: str, eval_batches: int | None = None) -> dict:
    """Validation loss / perplexity of the newest readable checkpoint in `workdir`, on the run's
    own corpus and held-out split. The mesh is rebuilt for this machine (all devices on the data
    axis), so a run trained on a pod evaluates on one host."""
    config = train.load_run_config(workdir)
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
        if eval_batches is not None:
            config.data.eval_batches = eval_batches
    validate.check(config)
    corpus = data.load_corpus(config)
    mesh = sharding.make_mesh(config)
    setup = train.Setup.create(config, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        restored = ckpt.Checkpoints(workdir, config.checkpoint.max_to_keep).restore_latest(
            setup.abstract_state)
        if restored is None:
            raise train.RunError(f"{workdir} has no checkpoint to evaluate")
        step, state = restored
        batches = data.validation_batches(corpus, config)
        loss = setup.evaluate(state.params, batches)
    return {"workdir": str(workdir), "step": step, "val_loss": loss, "val_ppl": math.exp(loss),
            "val_tokens": len(batches) * config.data.batch_size * config.model.seq_len}
