#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the tests and print its SQLAlchemy URL on the last line.
#
#   HUB_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh 54329 | tail -n 1)
#
# As root (CI, developer containers) the server runs as the `postgres` user, since PostgreSQL refuses to run as
# root; as any other user it runs as that user. Listens on 127.0.0.1 only, with trust authentication: for
# tests, never for real data.
# If a server already answers on the port, it is reused, so running the script twice is harmless.
# The data directory is printed on stderr; stop the server with: runuser -u postgres -- PG_CTL -D DATADIR stop
set -euo pipefail

PORT=${1:-54329}
DB=${HUB_TEST_POSTGRES_DB:-hub_test}

find_bin() {
  local found
  found=$(command -v "$1" 2>/dev/null || true)
  if [ -z "$found" ]; then
    # Debian keeps the server binaries out of PATH, one folder per major version; take the newest.
    found=$(ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  if [ -z "$found" ]; then
    echo "error: $1 not found; install the server with: apt-get install -y postgresql" >&2
    exit 1
  fi
  echo "$found"
}

INITDB=$(find_bin initdb)
PG_CTL=$(find_bin pg_ctl)
BIN_DIR=$(dirname "$PG_CTL")
PSQL=$(command -v psql || echo "$BIN_DIR/psql")
PG_ISREADY=$(command -v pg_isready || echo "$BIN_DIR/pg_isready")

if [ "$(id -u)" = 0 ]; then
  id -u postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  SERVER_USER=postgres
else
  SERVER_USER=$(id -un)
fi

as_server_user() {
  if [ "$(id -un)" = "$SERVER_USER" ]; then "$@"; else runuser -u "$SERVER_USER" -- "$@"; fi
}

if ! "$PG_ISREADY" -q -h 127.0.0.1 -p "$PORT"; then
  # Under /tmp, not $TMPDIR: the server user must reach it, and root's TMPDIR may be private.
  DATA=$(mktemp -d "/tmp/hub-postgres-$PORT-XXXXXX")
  chown "$SERVER_USER": "$DATA"
  chmod 700 "$DATA"
  as_server_user "$INITDB" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C >"$DATA.initdb.log" 2>&1 || {
    cat "$DATA.initdb.log" >&2
    exit 1
  }
  # The socket goes in the data dir: /var/run/postgresql may not exist or belong to another server.
  as_server_user "$PG_CTL" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $PORT -k $DATA -c max_connections=200 -c fsync=off" start >&2 || {
    cat "$DATA/server.log" >&2
    exit 1
  }
  echo "data directory: $DATA (log: $DATA/server.log)" >&2
fi

if [ "$("$PSQL" -h 127.0.0.1 -p "$PORT" -U postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
  "$PSQL" -h 127.0.0.1 -p "$PORT" -U postgres -qc "CREATE DATABASE $DB" >&2
fi
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/$DB"
