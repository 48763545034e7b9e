"""Run a multi-process (multi-host) training on this one machine, e.g. to check a multi-host
setup on CPU before a pod run:

    python launch/local.py --processes=2 --devices_per_process=4 --workdir=/tmp/mh -- \
        --config.mesh.fsdp=2

starts N `qat-jax train` processes with a local coordinator; each process gets
`--devices_per_process` CPU devices (XLA_FLAGS), so the mesh spans N x that many devices.
Prints the commands and waits for all of them (exit status: the worst one's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import shell, train_command  # noqa: E402


def build(args) -> list[tuple[list[str], dict]]:
    out = []
    for i in range(args.processes):
        argv = train_command(args.config, args.workdir, args.overrides, python=sys.executable,
                             distributed=[f"--coordinator_address=localhost:{args.port}",
                                          f"--num_processes={args.processes}",
                                          f"--process_id={i}"])
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}",
               "JAX_PLATFORMS": "cpu"}
        out.append((argv, env))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=1)
    p.add_argument("--port", type=int, default=12355)
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--workdir", required=True)
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides (after --)")
    args = p.parse_args(argv)
    commands = build(args)
    for argv_i, env in commands:
        print(" ".join(f"{k}={v}" for k, v in env.items()), shell(argv_i), flush=True)
    if args.dry_run:
        return 0
    procs = [subprocess.Popen(a, env={**os.environ, **e}) for a, e in commands]
    return max(proc.wait() for proc in procs)


if __name__ == "__main__":
    sys.exit(main())
