#!/usr/bin/env bash
# Set up everything and run the whole test suite, PostgreSQL tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${HUB_TEST_POSTGRES_URL:-}" ] && [ "$(id -u)" = 0 ]; then
  HUB_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh 54329 | tail -n 1)
  export HUB_TEST_POSTGRES_URL
fi
.venv/bin/ruff check hub cli tests bench scripts
.venv/bin/pytest -q "$@"
