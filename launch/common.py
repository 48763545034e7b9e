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


def add_remote_args(parser, workdir_help: str):
    """Arguments of the launchers that start `qat-jax train` on other machines."""
    parser.add_argument("--repo_dir", default="~/qat_jax", help="checkout of qat_jax there")
    parser.add_argument("--python", default="python3")
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--workdir", required=True, help=workdir_help)
    parser.add_argument("--execute", action="store_true", help="run instead of printing")
    parser.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides (after --)")
