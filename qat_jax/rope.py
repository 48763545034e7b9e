"""Rotary position embedding (Su et al. 2021) in Llama's half-split layout, with a backward of
its own for 16-bit activations."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def rope(x_BLHE, positions_L, theta: float, seq_axis: int = 1):
    """Rotary embedding (Su et al. 2021), Llama's half-split layout: dimension i is paired with
    i + E/2 and the pair is rotated by angle position * theta^(-2i/E). Computed in float32
    whatever x's dtype; see _rotate for the backward pass. `seq_axis`: x's sequence axis
    (2 for the heads-first [B, H, L, E] layout). Positions [B, L] give each row its own (the
    [B, L, H, E] layout)."""
    half = x_BLHE.shape[-1] // 2
    # Tables of static values are constants, computed once as the step is traced, by the same
    # operations: computed inside the step, XLA CPU fuses sin and cos into the rotation and
    # evaluates them again for every batch row and head (7% of the tiny model's bf16 step on
    # an AMX CPU: docs/performance.md). Training's positions are static (numpy's 0..L-1).
    with _eagerly():
        freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x_BLHE.shape[-1])
    if jnp.ndim(positions_L) == 2:  # [B, L]: each row at its own positions (cached decoding)
        angle_BLE = positions_L[..., None].astype(jnp.float32) * freq
        sin, cos = jnp.sin(angle_BLE)[:, :, None], jnp.cos(angle_BLE)[:, :, None]
        return _rotation(x_BLHE, sin, cos)
    shape = [1] * x_BLHE.ndim
    shape[seq_axis], shape[-1] = len(positions_L), half
    with _eagerly():
        angle_LE = jnp.asarray(positions_L)[:, None].astype(jnp.float32) * freq[None, :]
        sin, cos = jnp.sin(angle_LE).reshape(shape), jnp.cos(angle_LE).reshape(shape)
    # A 16-bit x: autodiff would keep float32 copies of x's halves for the backward (13% of
    # the 86m step's HBM traffic on TPU); _rotate's own backward keeps nothing of x.
    return (_rotation if x_BLHE.dtype == jnp.float32 else _rotate)(x_BLHE, sin, cos)


@contextlib.contextmanager
def _eagerly():
    """Operations on concrete values evaluated now, inside a trace, whatever mesh the trace is
    under: outside it (a shard_map's manual axes would reject the new arrays' shardings)."""
    with jax.ensure_compile_time_eval(), jax.sharding.use_abstract_mesh(_NO_MESH):
        yield


_NO_MESH = jax.sharding.AbstractMesh((), ())


def _rotation(x_BLHE, sin, cos):
    """Each pair (x1, x2) rotated by the angle whose sine and cosine are given, in float32,
    the result in x's dtype."""
    half = x_BLHE.shape[-1] // 2
    x1, x2 = x_BLHE[..., :half].astype(jnp.float32), x_BLHE[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHE.dtype)


# _rotation with a backward of its own: a rotation is linear, so its backward is the rotation
# by minus the angle, and nothing of x is kept for it.
_rotate = jax.custom_vjp(_rotation)


def _rotate_fwd(x_BLHE, sin, cos):
    return _rotation(x_BLHE, sin, cos), (sin, cos)


def _rotate_bwd(res, g_BLHE):
    sin, cos = res
    # sin and cos are functions of the positions alone: no gradient flows to them
    return _rotation(g_BLHE, -sin, cos), jnp.zeros_like(sin), jnp.zeros_like(cos)


_rotate.defvjp(_rotate_fwd, _rotate_bwd)
