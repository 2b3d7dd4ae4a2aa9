#!/usr/bin/env bash
# TRAM on one node: NPROC_PER_NODE processes (one per GPU; gloo processes on a CPU-only machine).
#   bash launch/torchrun_single_node.sh [script args...]
#   NPROC_PER_NODE=8 SCRIPT=examples/fsdp2.py bash launch/torchrun_single_node.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
SCRIPT="${SCRIPT:-$ROOT/examples/ddp.py}"
PYTHON="${PYTHON:-python}"

# --standalone: a local c10d rendezvous on a free port, so two jobs on one node never collide.
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC_PER_NODE" "$SCRIPT" "$@"
