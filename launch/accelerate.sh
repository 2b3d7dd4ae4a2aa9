#!/usr/bin/env bash
# TRAM under `accelerate launch`, plain DDP. Several machines: run it on each, with its MACHINE_RANK.
#   bash launch/accelerate.sh [script args...]
#   NUM_MACHINES=2 NUM_PROCESSES=16 MACHINE_RANK=1 MAIN_PROCESS_IP=node0 bash launch/accelerate.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

CONFIG="${CONFIG:-$ROOT/launch/accelerate_config.yaml}"
NUM_PROCESSES="${NUM_PROCESSES:-2}"       # in all, over all machines
NUM_MACHINES="${NUM_MACHINES:-1}"
MACHINE_RANK="${MACHINE_RANK:-0}"
MAIN_PROCESS_IP="${MAIN_PROCESS_IP:-127.0.0.1}"  # machine 0's address
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"  # 0: a free port (one machine only)
SCRIPT="${SCRIPT:-$ROOT/launch/accelerate_train.py}"
ACCELERATE="${ACCELERATE:-accelerate}"

exec "$ACCELERATE" launch --config_file "$CONFIG" --num_processes "$NUM_PROCESSES" \
  --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" "$SCRIPT" "$@"
