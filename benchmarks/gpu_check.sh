#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): the train step of configs/paper.py:86m and :160m in
# bfloat16 with cuDNN attention, FP and 4-bit QAT (tokens/s, MFU, memory, QAT/FP), and a short
# `qat-jax train` across the FP -> QAT switch with `qat-jax eval`, as one table.
#   bash benchmarks/gpu_check.sh [--out=DIR]     # on a GPU machine with JAX; at most 8 minutes
#   bash benchmarks/gpu_check.sh --shrink        # tiny shapes on any machine (the tests run it)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
