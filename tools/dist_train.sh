#!/usr/bin/env bash
# Distributed training on one or more machines, as mmdet's tools/dist_train.sh:
#   tools/dist_train.sh CONFIG GPUS [train.py options]
# GPUS, NNODES, NODE_RANK, PORT, MASTER_ADDR and PYTHON as in tools/dist_run.sh.
set -euo pipefail

exec bash "$(dirname "$0")/dist_run.sh" train.py "$2" "$1" --launcher pytorch "${@:3}"
