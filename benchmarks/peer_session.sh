#!/bin/bash
# One session of issue 32's comparison, peer and ours alternating: per round, ParetoQ's step
# in float32 and under bf16 autocast (benchmarks/paretoq_peer.py, in a scratch environment with
# torch and transformers 4.48), then `qat-jax bench` in float32 with XLA's own forms
# (model.cpu_kernels=false), in float32 through qat_jax/kernels.py (the float32 default), and
# with bfloat16 operands; FP and 4-bit QAT each.
#
#   PEER_PYTHON=/path/to/torch-venv/bin/python PARETOQ=/path/to/ParetoQ \
#       bash benchmarks/peer_session.sh [ROUNDS] [SEQ_LEN] [BATCH]
#
# Run it on an idle machine: nothing else may share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}; SEQ=${2:-256}; BATCH=${3:-8}
: "${PEER_PYTHON:?set PEER_PYTHON to a Python with torch and transformers 4.48}"
: "${PARETOQ:?set PARETOQ to a ParetoQ checkout (its models/ folder)}"
peer() {
  "$PEER_PYTHON" benchmarks/paretoq_peer.py --paretoq="$PARETOQ" --bits=16,4 --steps=5 \
    --rounds=2 --seq_len="$SEQ" --batch_size="$BATCH" "$@" | grep '^bits'
}
ours() {
  qat-jax bench --config.model.seq_len="$SEQ" --config.data.batch_size="$BATCH" --steps=5 \
    --qat_bits=4 "$@" 2>&1 | grep -E '^(tokens/s|MFU|QAT)' | tr -s ' \n' ' '
  echo
}
for r in $(seq "$ROUNDS"); do
  echo "=== round $r (sequence $SEQ, batch $BATCH; $(date -u +%FT%TZ))"
  peer | sed 's/^/peer float32: /'
  peer --autocast | sed 's/^/peer bf16 autocast: /'
  echo -n "ours float32, XLA's forms: "; ours --config.model.matmul_precision=float32 \
    --config.model.cpu_kernels=false
  echo -n "ours float32: "; ours --config.model.matmul_precision=float32
  echo -n "ours bfloat16 operands: "; ours --config.model.matmul_precision=bfloat16
done
