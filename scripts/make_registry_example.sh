#!/usr/bin/env bash
# Regenerate registry.db.example: run the demo into a throwaway HUB_HOME and keep a copy of its registry.
# Run it after a migration changes the schema (tests/test_registry_example.py checks the revision).
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=$(mktemp -d)
trap 'rm -rf "$HOME_DIR"' EXIT
HUB_HOME="$HOME_DIR" .venv/bin/python scripts/demo.py --example registry.db.example "$@"
