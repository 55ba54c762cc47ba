#!/usr/bin/env bash
# Installs what the tests need (redis-server from Debian if missing) and runs lint + tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
python3 -m pip install -q -e '.[test]'
ruff check .
ruff format --check .
# pytest exits 5 when it collects no test; that must fail, and `set -e` makes sure it does.
python3 -m pytest -q
