#!/usr/bin/env bash
# Installs what Herald's test suite needs beyond Rust itself, if it is missing:
# - the Python CloudEvents SDK, the independent implementation the interop tests talk to.
set -euo pipefail

if ! python3 -c 'import cloudevents' 2>/dev/null; then
  echo "installing the Python CloudEvents SDK (interop tests)"
  python3 -m pip install --quiet --disable-pip-version-check 'cloudevents==2.2.0'
fi
