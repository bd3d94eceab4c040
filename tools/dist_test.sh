#!/usr/bin/env bash
# Distributed evaluation, as mmdet's tools/dist_test.sh:
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]
# GPUS, NNODES, NODE_RANK, PORT, MASTER_ADDR and PYTHON as in tools/dist_run.sh.
set -euo pipefail

exec bash "$(dirname "$0")/dist_run.sh" test.py "$3" "$1" "$2" --launcher pytorch "${@:4}"
