"""What every launcher shares: the `qat-jax train` command line of one process."""

from __future__ import annotations

import shlex


def train_command(config: str, workdir: str, overrides: list[str], python: str = "python3",
                  distributed: list[str] | None = None) -> list[str]:
    """argv of one training process: `python -m qat_jax train ...` plus distributed flags."""
    for o in overrides:
        if not o.startswith("--config."):
            raise ValueError(f"override {o!r} must look like --config.group.key=value")
    return [python, "-m", "qat_jax", "train", f"--config={config}", f"--workdir={workdir}",
            *(distributed or []), *overrides]


def shell(argv: list[str]) -> str:
    return shlex.join(argv)
