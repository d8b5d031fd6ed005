#!/usr/bin/env bash
# The Debian packages the tests use beyond Python: PostgreSQL's server (the team-registry tests) and Chromium with
# its driver (the browser tests). Installed only when missing, and only as root (elsewhere: say what to install).
set -euo pipefail
packages=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || packages+=(chromium chromium-driver)
[ ${#packages[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "note: install ${packages[*]} (apt-get install -y ${packages[*]}) to run the PostgreSQL and browser tests" >&2
  exit 0
fi
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
