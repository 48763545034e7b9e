"""Evaluation of a run's newest checkpoint: validation loss and perplexity of the model as
trained and, for a quantized run, of its full-precision weights side by side."""

from __future__ import annotations

import math

import jax

from qat_jax import data, sharding
from qat_jax.tools.restore import restore


def evaluate_workdir(workdir: str, eval_batches: int | None = None) -> dict:
    """Validation loss / perplexity on the run's own held-out split. Once a run is past its
    FP -> QAT switch, `val_loss` is the quantized model (as served) and `val_loss_fp` the same
    weights without quantization; before it, `val_loss` is the full-precision model."""
    run, setup, step, params = restore(workdir, eval_batches)
    spec = run.data
    corpus = data.load_corpus(spec)
    batches = data.validation_batches(corpus, spec)
    quantized = setup.plan.quantized_after(step)
    out = {"workdir": str(workdir), "step": step, "phase": "qat" if quantized else "fp",
           "bits": setup.plan.bits if quantized else None}
    with jax.set_mesh(setup.mesh), sharding.axis_rules():
        out["val_loss"] = setup.evaluate(params, batches, setup.phase_after(step))
        if quantized:
            out["val_loss_fp"] = setup.evaluate(params, batches, setup.fp)
    for key in [k for k in out if k.startswith("val_loss")]:
        out[key.replace("loss", "ppl")] = math.exp(out[key])
    out["val_tokens"] = len(batches) * spec.batch_size * spec.seq_len
    return out
