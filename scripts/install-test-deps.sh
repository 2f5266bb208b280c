#!/usr/bin/env bash
# Installs what Herald's test suite needs beyond Rust itself, if it is missing:
# - the Python CloudEvents SDK, the independent implementation the interop tests talk to.
set -euo pipefail

if ! python3 -c 'import cloudevents' 2>/dev/null; then
  echo "installing the Python CloudEvents SDK (interop tests)"
  python3 -m pip install --quiet --disable-pip-version-check 'cloudevents==2.2.0'
fi

# - PostgreSQL's server binaries, for the throwaway servers of herald-testkit (the outbox,
#   inbox and checkpoint tests on PostgreSQL). Found like herald-testkit finds them.
has_postgres() {
  local bindir
  bindir="$(pg_config --bindir 2>/dev/null || true)"
  if [ -n "$bindir" ] && [ -x "$bindir/initdb" ]; then return 0; fi
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
if ! has_postgres; then
  echo "installing PostgreSQL (herald-testkit's throwaway servers)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
