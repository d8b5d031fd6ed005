#!/usr/bin/env bash
# The main job on a fresh machine: set everything up, then run the end-to-end story on the real SmolLM2 base.
# The registry it fills is left in HUB_HOME (default ~/.adapter-hub): explore it with `.venv/bin/hub list`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/demo.py "$@"
