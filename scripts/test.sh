#!/usr/bin/env bash
# Set up everything (Debian packages, the virtualenv) and run the whole test suite, PostgreSQL and browser tests
# included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system_packages.sh
bash scripts/setup.sh
if [ -z "${HUB_TEST_POSTGRES_URL:-}" ] && [ "$(id -u)" = 0 ]; then
  HUB_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh 54329 | tail -n 1)
  export HUB_TEST_POSTGRES_URL
fi
.venv/bin/ruff check hub cli tests bench scripts
.venv/bin/pytest -q "$@"
