#!/usr/bin/env bash
# Install Outrigger with its test dependencies into .venv, then run ruff, mypy and the test suite.
# The same command runs in CI (.ci/run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v curl >/dev/null || { echo "curl is required by the end-to-end tests (apt-get install curl)" >&2; exit 1; }
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || {
    echo "nginx is required by the differential transport tests, which start their own on loopback" \
        "(apt-get install nginx; .ci/run installs it without starting a system nginx)" >&2
    exit 1
}
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest -q "$@"
