#!/usr/bin/env bash
# TRAM under the deepspeed launcher. With several hosts in HOSTFILE the launcher starts every
# host's ranks over passwordless ssh (pdsh), and rank 0 runs on the first host.
#   bash launch/deepspeed.sh [script args...]
#   HOSTFILE=/path/to/hostfile MASTER_PORT=29600 bash launch/deepspeed.sh
#   HOSTFILE= NUM_GPUS=2 bash launch/deepspeed.sh   # this node only (needed on a CPU-only node)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

HOSTFILE="${HOSTFILE-$ROOT/launch/hostfile.example}"  # empty: this node only
NUM_GPUS="${NUM_GPUS:-}"        # ranks per host; empty: the hostfile's slots, or every visible GPU
MASTER_ADDR="${MASTER_ADDR:-}"  # empty: the launcher asks the first host for its address over ssh
MASTER_PORT="${MASTER_PORT:-29500}"
SSH_CHECK="${SSH_CHECK:-1}"     # 0: skip the launcher's ssh check of the first host
SCRIPT="${SCRIPT:-$ROOT/examples/deepspeed_zero3.py}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"

args=(--master_port "$MASTER_PORT")
if [ -n "$HOSTFILE" ]; then
  args+=(--hostfile "$HOSTFILE")
fi
if [ -n "$NUM_GPUS" ]; then
  # On a CPU-only node the launcher counts 1 device: without a hostfile it then starts 1 rank.
  args+=(--num_gpus "$NUM_GPUS")
fi
if [ -n "$MASTER_ADDR" ]; then
  args+=(--master_addr "$MASTER_ADDR")
fi
if [ "$SSH_CHECK" = 0 ]; then
  args+=(--no_ssh_check)
fi
# Each rank gets --local_rank=N after SCRIPT: the script must accept (or ignore) it.
exec "$DEEPSPEED" "${args[@]}" "$SCRIPT" "$@"
