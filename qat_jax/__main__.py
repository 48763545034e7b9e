"""`python -m qat_jax ...` is the `qat-jax` command."""

from qat_jax.cli import run

if __name__ == "__main__":  # grain worker processes import this module: keep the guard
    run()
