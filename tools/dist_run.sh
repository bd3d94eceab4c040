#!/usr/bin/env bash
# The torchrun launch behind tools/dist_train.sh and tools/dist_test.sh:
#   tools/dist_run.sh SCRIPT GPUS [SCRIPT's arguments]
# runs tools/SCRIPT in GPUS processes on this machine (one per GPU; without a GPU, CPU processes
# that mmattn connects with gloo). Several machines: the same command on each, with NNODES,
# NODE_RANK and MASTER_ADDR (the address of NODE_RANK=0) set; PORT must be free there. PYTHON
# picks the interpreter (e.g. .venv/bin/python).
set -euo pipefail

SCRIPT=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/$SCRIPT" \
    "${@:3}"
