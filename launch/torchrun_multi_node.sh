#!/usr/bin/env bash
# TRAM on NNODES nodes: run this once on every node, each with its own NODE_RANK and the same
# RDZV_ENDPOINT (a host:port that every node reaches; the agent on that host serves the c10d store).
#   node 0:  NODE_RANK=0 RDZV_ENDPOINT=node0:29500 bash launch/torchrun_multi_node.sh [script args...]
#   node 1:  NODE_RANK=1 RDZV_ENDPOINT=node0:29500 bash launch/torchrun_multi_node.sh [script args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NNODES="${NNODES:-2}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-127.0.0.1:29500}"
RDZV_ID="${RDZV_ID:-tram}"  # the same on every node of a job, different between jobs
SCRIPT="${SCRIPT:-$ROOT/examples/ddp.py}"
PYTHON="${PYTHON:-python}"

# The c10d rendezvous waits until NNODES agents have joined at RDZV_ENDPOINT, then starts
# NNODES * NPROC_PER_NODE ranks. It assigns the ranks itself (agents sorted by host name and pid):
# only the static backend reads --node_rank, so global rank 0 need not run on NODE_RANK 0.
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" \
  --rdzv_id "$RDZV_ID" "$SCRIPT" "$@"
