#!/usr/bin/env bash
# GPU readiness check of the torch executor (see bench/gpu_check.py); exit 0 when nothing FAILED.
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/gpu_check.py "$@"
