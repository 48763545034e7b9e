"""The default: a 4-layer, d_model=256 decoder on the embedded King James Bible.

    qat-jax train                       # same as --config=configs/tiny.py
    qat-jax train --config=configs/tiny.py --workdir=/tmp/tiny

Measured on 2 CPU cores (with avx512_bf16, so bfloat16 matmul operands): 187 s in all (about
6.9k tokens/s), validation loss 4.163 nats (perplexity 64.3) against a unigram entropy of 6.02
nats (BPE vocabulary of 4096 pieces); with --config.model.matmul_precision=float32, 323 s and
4.161 nats.
Batch 16 rather than 32: on 2 cores the smaller step runs faster per token (cache-resident
activations) and gives twice the updates for the same tokens.
"""

from configs import base


def get_config():
    c = base.get_config()
    # base.py's defaults are the tiny model; it is spelled out here so this file documents it.
    c.model.d_model = 256
    c.model.n_layers = 4
    c.model.seq_len = 128
    c.data.batch_size = 16
    c.schedule.total_tokens = 1_200_000
    return c
