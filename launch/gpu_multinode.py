"""Build one `qat-jax train` command per node of a multi-node GPU job.

    python launch/gpu_multinode.py --hosts=node0,node1,node2,node3 --port=1234 \
        --config=configs/paper.py:2.2b --workdir=/shared/runs/2.2b \
        -- --config.data.path=/shared/data/dclm --config.mesh.fsdp=8

prints, for each node i, `ssh node_i 'cd REPO && python3 -m qat_jax train
--coordinator_address=node0:1234 --num_processes=N --process_id=i ...'`. Process 0 (the first
host) is the coordinator; every process sees its node's GPUs as local devices. Under SLURM,
`srun python3 -m qat_jax train --distributed ...` does the same without this script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_remote_args, shell, train_command  # noqa: E402


def build(args) -> list[list[str]]:
    hosts = [h for h in args.hosts.split(",") if h]
    if not hosts:
        raise SystemExit("--hosts: give at least one host name")
    commands = []
    for i, host in enumerate(hosts):
        inner = train_command(args.config, args.workdir, args.overrides, python=args.python,
                              distributed=[f"--coordinator_address={hosts[0]}:{args.port}",
                                           f"--num_processes={len(hosts)}", f"--process_id={i}"])
        commands.append(["ssh", host, f"cd {args.repo_dir} && {shell(inner)}"])
    return commands


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", required=True, help="comma-separated node names; the first "
                   "is the coordinator")
    p.add_argument("--port", type=int, default=1234)
    add_remote_args(p, workdir_help="a filesystem shared by all nodes")
    args = p.parse_args(argv)
    commands = build(args)
    if args.execute:
        procs = [subprocess.Popen(c) for c in commands]
        return max(proc.wait() for proc in procs)
    for c in commands:
        print(shell(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
