"""XLA's persistent compilation cache: a rerun, a resume or a sweep's next branch loads its
train step instead of compiling it again."""

from __future__ import annotations

from pathlib import Path

import jax


def use_compilation_cache(directory: str, min_compile_s: float) -> None:
    """XLA's persistent compilation cache in `directory` (local, or cloud storage), for
    compiles of at least `min_compile_s`, unless one is set already (by
    JAX_COMPILATION_CACHE_DIR in the environment, or a repro's own): a rerun, a resume or a
    sweep's next branch then loads its train step instead of compiling it. '' sets none."""
    if directory and not jax.config.jax_compilation_cache_dir:
        local = "://" not in directory
        jax.config.update("jax_compilation_cache_dir",
                          str(Path(directory).expanduser()) if local else directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
