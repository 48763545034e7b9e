"""The layer layout of a decoder's parameter tree: with model.scan_layers the blocks'
parameters are stacked under one axis, without it they are block_0, block_1, ...; everything
that reads matrices one layer at a time (the quantized matrices, the exports, generation, the
checkpoint conversions) goes through `unstack_layers`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# model.scan_layers: the blocks' parameters live stacked under params[SCANNED][SCANNED_BLOCK]
# with a leading layer axis, where the loop has params["block_0"], params["block_1"], ...
SCANNED, SCANNED_BLOCK = "blocks", "block"


def unstack_layers(params):
    """A scanned model's parameters in the loop's layout (block_0, block_1, ...); any other
    tree unchanged. Every function below reads matrices one layer at a time through this."""
    if SCANNED not in params:
        return params
    stacked = params[SCANNED][SCANNED_BLOCK]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != SCANNED}
    out.update({f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)})
    return out


def restack_layers(unstacked, like):
    """The inverse of unstack_layers, for a tree shaped like `like`."""
    if SCANNED not in like:
        return unstacked
    n = jax.tree.leaves(like[SCANNED])[0].shape[0]
    blocks = [unstacked[f"block_{i}"] for i in range(n)]
    out = {k: v for k, v in unstacked.items() if not k.startswith("block_")}
    out[SCANNED] = {SCANNED_BLOCK: jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return out
