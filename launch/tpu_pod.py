"""Build the command that trains on every worker of a Cloud TPU pod slice.

    python launch/tpu_pod.py --tpu=my-v5p-64 --zone=us-east5-a --project=my-proj \
        --repo_dir=~/qat_jax --config=configs/paper.py:759m --workdir=gs://bucket/runs/759m \
        -- --config.data.path=/mnt/disks/data/dclm

prints `gcloud compute tpus tpu-vm ssh ... --worker=all --command=...`: every worker runs the
same `qat-jax train --distributed`, and jax.distributed.initialize() finds its peers from the TPU
metadata. The workdir must be shared by all workers (a GCS bucket), so each worker's checkout
needs `pip install -e ".[tpu,gcs]"`. Add --execute to run it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_remote_args, shell, train_command  # noqa: E402


def build(args) -> list[str]:
    inner = train_command(args.config, args.workdir, args.overrides, python=args.python,
                          distributed=["--distributed"])
    remote = f"cd {args.repo_dir} && {shell(inner)}"
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}",
           "--worker=all", f"--command={remote}"]
    if args.project:
        cmd.insert(6, f"--project={args.project}")
    return cmd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tpu", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="")
    add_remote_args(p, workdir_help="shared by all workers (gs://...)")
    args = p.parse_args(argv)
    cmd = build(args)
    if args.execute:
        return subprocess.call(cmd)
    print(shell(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
