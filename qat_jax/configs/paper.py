"""The paper's Llama-2-style model family (Dremov et al., ICLR 2026, section 4 of METHOD.md):
sequence length 1024, a 32k sentencepiece vocabulary (Llama-2's), tied embeddings, bfloat16
compute on accelerators, AdamW with weight decay 0.01. Sizes are named by parameter count
(all parameters, embedding included); `param_count` is within 0.6% of every name.

    qat-jax prepare --input='dclm/*.jsonl' --tokenizer=llama2/tokenizer.model --out=/data/dclm
    qat-jax train --config=configs/paper.py:759m --config.data.path=/data/dclm \\
        --workdir=gs://bucket/runs/759m

The token budget defaults to 20 tokens per parameter (Chinchilla-optimal); override
`schedule.total_tokens`. Peak learning rates and the batch size are our choices (the paper's
are not public). Sizes: 86m, 160m, 270m, 460m, 759m, 1.3b, 2.2b.
"""

from qat_jax.configs import base

# name: (d_model, n_layers, n_heads, d_ff, peak_lr)
SIZES = {
    "86m": (640, 12, 10, 1984, 3e-3),
    "160m": (768, 16, 12, 2624, 3e-3),
    "270m": (1024, 16, 16, 3456, 2e-3),
    "460m": (1280, 20, 20, 3776, 1.5e-3),
    "759m": (1536, 22, 12, 4928, 1.5e-3),
    "1.3b": (2048, 20, 16, 7296, 1e-3),
    "2.2b": (2560, 24, 20, 8064, 1e-3),
}
NOMINAL = {"86m": 86e6, "160m": 160e6, "270m": 270e6, "460m": 460e6, "759m": 759e6,
           "1.3b": 1.3e9, "2.2b": 2.2e9}


def get_config(size: str = "86m"):
    if size not in SIZES:
        raise ValueError(f"configs/paper.py:{size}: unknown size; valid: {list(SIZES)}")
    d_model, n_layers, n_heads, d_ff, peak_lr = SIZES[size]
    c = base.get_config()
    c.model.vocab_size = 32000
    c.model.seq_len = 1024
    c.model.d_model, c.model.n_layers, c.model.d_ff = d_model, n_layers, d_ff
    c.model.n_heads = c.model.n_kv_heads = n_heads
    c.model.compute_dtype = "auto"
    c.optimizer.peak_lr = peak_lr
    c.optimizer.weight_decay = 0.01
    c.data.source = "array_record"  # a `qat-jax prepare` directory: set data.path
    c.data.batch_size = 256  # sequences: 262,144 tokens per step
    c.schedule.total_tokens = int(20 * NOMINAL[size])
    c.checkpoint.every_steps = 1000
    c.logging.every_steps = 50
    c.logging.eval_every_steps = 1000
    c.data.eval_batches = 20
    return c
