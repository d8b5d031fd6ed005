#!/usr/bin/env bash
# CUDA checks (bring-your-own-model, PEFT equality, weighted sums, mixtures): prints figures, or says plainly that
# it skipped when this machine has no CUDA GPU. Needs a CUDA build of torch in .venv (scripts/setup.sh installs
# the CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
export HUB_HOME="${HUB_HOME:-$(mktemp -d)}"
.venv/bin/python scripts/gpu_check.py "$@"
