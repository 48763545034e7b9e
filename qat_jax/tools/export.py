"""`qat-jax export`: a run's newest checkpoint as the packed low-bit safetensors file
(packed.py), a llama.cpp GGUF file (gguf_export.py) or a Hugging Face Llama directory (hf.py)."""

from __future__ import annotations

import jax

from qat_jax import data
from qat_jax.tools import packed
from qat_jax.tools.restore import restore


def export_packed(workdir: str, out: str, dtype: str = "bfloat16") -> dict:
    """Export the newest checkpoint of a quantized run (the format: packed.py)."""
    run, setup, step, params = restore(workdir)
    if not setup.plan.quantized_after(step):
        raise ValueError(
            f"{workdir}: a full-precision run has no quantized model to export (quant.bits=None "
            f"or a QAT fraction of 0)" if setup.plan.bits is None else
            f"{workdir}: the newest checkpoint (step {step}) is before the run's FP -> QAT "
            f"switch at step {setup.plan.qat_start}: nothing is quantized yet")
    sizes = packed.export_params(params, run, out, dtype)
    return {"step": step, "bits": run.quant.bits, **sizes}


def export_gguf(workdir: str, out: str) -> dict:
    """The newest checkpoint of a quantized run as a llama.cpp GGUF file (gguf_export.py)."""
    from qat_jax.tools import gguf_export

    run, setup, step, params = restore(workdir)
    if not setup.plan.quantized_after(step):
        raise ValueError(f"{workdir}: a full-precision run (or one before its QAT phase) has no "
                         f"quantized model for --format=gguf; --format=hf exports it")
    tokenizer = data.load_corpus(run.data).tokenizer_path
    written = gguf_export.export(jax.device_get(params), run.model, run.quant, out, tokenizer)
    return {"step": step, "bits": run.quant.bits, **written}


def export_hf(workdir: str, out: str, dtype: str = "float32") -> dict:
    """The newest checkpoint of a run as a Hugging Face Llama directory (hf.py): its weights
    as served (quantized once past the switch), their scales, and the run's tokenizer."""
    from qat_jax.tools import hf

    run, setup, step, params = restore(workdir)
    quantized = setup.plan.quantized_after(step)
    tokenizer = data.load_corpus(run.data).tokenizer_path
    written = hf.export(jax.device_get(params), run.model, run.quant, out, quantized, tokenizer,
                        dtype)
    return {"step": step, "bits": run.quant.bits if quantized else None, **written}
