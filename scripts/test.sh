#!/usr/bin/env bash
# Installs what the tests need (Debian's redis-server, nginx, openssl and systemd's
# systemd-analyze, if missing) and runs lint + tests.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # one word per package
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
python3 -m pip install -q -e '.[test]'
ruff check .
ruff format --check .
# pytest exits 5 when it collects no test; that must fail, and `set -e` makes sure it does.
python3 -m pytest -q
# pyproject.toml's minimums, tested: the lowest allowed versions in a throwaway virtualenv (PyPI).
python3 scripts/min_versions.py
