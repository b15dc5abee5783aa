#!/usr/bin/env bash
# Everything that needs a GPU, in one command of at most 8 minutes on one H100/H200:
# the CUDA-only tests, speed and memory at full size, the attention bench, an epoch of every method.
#   bench/gpu_check.sh            # writes bench/results/<gpu name>-<date>.json and prints one table
#   bench/gpu_check.sh --dry-run  # the steps and their time budget, nothing run
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
