"""Training settings shared by every run of `qat-jax repro` (the paper's study at laptop scale).

    qat-jax repro --workdir=DIR [--quick]           # uses this file
    qat-jax repro --workdir=DIR --config.data.batch_size=64   # e.g. on a GPU

The repro sets, per point of its grid, the model's size (model.d_model, n_layers, n_heads,
n_kv_heads, d_ff), schedule.total_tokens, data.path (its prepared corpus), quant.bits and the
qat.* keys of each run; everything else comes from here. A small vocabulary keeps the
embedding from dominating N, so that a CPU reaches S of tens to hundreds of tokens per
parameter byte.
"""

from qat_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.vocab_size = 1024
    c.model.seq_len = 128
    c.data.source = "array_record"  # the repro's corpus, prepared once under its workdir
    c.quant.quantize_embedding = True  # as the paper: the tied embedding at max(B, 4) bits
    c.data.batch_size = 16
    # bfloat16 matmul operands (float32 products): 1.3-2.4x faster on a CPU with bf16 dot
    # instructions at these sizes, with the same verdicts as float32 at the point checked
    # (benchmarks/precision_point.py, benchmarks/precision_point.json)
    c.model.matmul_precision = "bfloat16"
    c.data.eval_batches = 32  # 65,536 validation tokens, the same for every run
    c.schedule.warmup_frac = 0.05
    c.schedule.cooldown_frac = 0.2  # the FP-only and unfused runs' own FP cooldown
    c.checkpoint.every_steps = 500
    c.checkpoint.max_to_keep = 2
    c.logging.every_steps = 50
    c.logging.eval_every_steps = 1_000_000  # validation at the end of each run only
    c.logging.tensorboard = False
    return c
