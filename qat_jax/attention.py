"""Causal (grouped-query) attention, one function with three implementations chosen by config.

- `xla`: `jax.nn.dot_product_attention`'s XLA path, a softmax over the full L x L scores (the
  masked half is computed too). Runs everywhere; the reference the others are tested against.
- `cudnn`: the same call with `implementation="cudnn"`: cuDNN's fused flash attention on NVIDIA
  GPUs (bfloat16 / float16 inputs only), causal blocks skipped.
- `splash`: the Pallas splash-attention kernel on TPU (jax.experimental.pallas.ops.tpu), a flash
  attention whose causal mask is block-sparse: blocks above the diagonal are skipped in the
  forward and both backward kernels. It runs per device inside `jax.shard_map` (batch split over
  the data axes, heads over the tensor axis, as the logical-axis rules say), since a Pallas call
  is not partitioned by XLA. On CPU it runs in Pallas' interpret mode (slow; for tests).

`resolve(name, platform, dtype)` turns the config's `auto` into one of them for the platform the
step is compiled for (not the host's: an ahead-of-time compile for TPU on a CPU host gets splash).

Shape key: B batch, L sequence, H query heads, K key/value heads, E head dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qat_jax.errors import ConfigError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def check_name(name: str):
    """ConfigError naming the implementations, for a name that is none of them."""
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={name!r}; valid: {IMPLEMENTATIONS}")


def resolve(name: str, platform: str, dtype) -> str:
    """The implementation `name` stands for on `platform` ('cpu', 'gpu', 'tpu'): auto is splash
    on TPU, cuDNN on GPU when the compute dtype is 16-bit (cuDNN's flash attention takes no
    float32), XLA otherwise. Raises ConfigError, naming the key, for one the platform cannot run
    (splash runs on CPU too, interpreted, for tests)."""
    check_name(name)
    gpu = platform in ("gpu", "cuda", "rocm")
    if name == "auto":
        if platform == "tpu":
            return "splash"
        return "cudnn" if gpu and jnp.dtype(dtype).itemsize == 2 else "xla"
    if name == "cudnn" and not (gpu and jnp.dtype(dtype).itemsize == 2):
        raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU and a 16-bit compute "
                         f"dtype (here: {platform}, {jnp.dtype(dtype).name}); use 'auto' or 'xla'")
    if name == "splash" and gpu:
        raise ConfigError("model.attention='splash' is a TPU kernel; on GPU use 'cudnn' or 'auto'")
    return name


def causal_attention(q_BLHE, k_BLKE, v_BLKE, *, implementation: str, block_size: int,
                     axes: tuple[str, str, str, str], platform: str):
    """softmax(q k^T / sqrt(E) + causal mask) v, with K dividing H (grouped-query attention).
    xla and cudnn take [B, L, H, E]; splash takes the heads-first [B, H, L, E] (its kernel's
    layout, which the model transposes to before RoPE). `axes` are the logical names of q's
    dimensions in its layout, which splash uses to split the call over the mesh; `platform`
    is the target's (splash is interpreted anywhere but on TPU)."""
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q_BLHE, k_BLKE, v_BLKE, is_causal=True,
                                            implementation=implementation)
    if implementation == "splash":
        return _splash(q_BLHE, k_BLKE, v_BLKE, block_size=block_size, axes=axes,
                       interpret=platform != "tpu")
    raise ValueError(f"attention implementation {implementation!r}; valid: {IMPLEMENTATIONS}")


def _splash(q_BLHE, k_BLKE, v_BLKE, *, block_size: int, axes, interpret: bool):
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, block_size=block_size, interpret=interpret)
    if mesh.empty:  # no mesh (a plain apply in a test): one device
        return local(q_BLHE, k_BLKE, v_BLKE)
    # The logical axes of q become mesh axes by the active rules (sharding.axis_rules); k and v
    # split their heads like q's, so each device holds whole groups of a grouped-query layout.
    # A dimension its mesh axes do not divide (the batch of 1 that init traces) stays whole.
    spec = jax.sharding.PartitionSpec(*(
        names if all(x.shape[i] % _axes_size(mesh, names) == 0 for x in (q_BLHE, k_BLKE))
        else None for i, names in enumerate(nn.logical_to_mesh_axes(axes))))
    # Inside a shard_map over the batch axes (sharding.per_device_batch) those are manual
    # already: this one is over the others.
    free = frozenset(mesh.axis_names) - frozenset(mesh.manual_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         axis_names=free, check_vma=False)(q_BLHE, k_BLKE, v_BLKE)


def _axes_size(mesh, names) -> int:
    names = (names,) if isinstance(names, str) else (names or ())
    return int(np.prod([mesh.shape[n] for n in names]))


def _splash_local(q_BHLE, k_BKLE, v_BKLE, *, block_size: int, interpret: bool):
    """Splash attention on one device's shard: the kernel is per example and head-major."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, H, L, E = q_BHLE.shape
    block = min(block_size, L)  # ModelConfig.from_config: L is a multiple of it
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.CausalMask((L, L)) for _ in range(H)])
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    # The kernel does not scale the scores: fold 1/sqrt(E) into q (as the XLA path does).
    return jax.vmap(kernel)(q_BHLE * (1.0 / np.sqrt(E)).astype(q_BHLE.dtype), k_BKLE, v_BKLE)
