#!/usr/bin/env bash
# Install the system packages and Outrigger with its test dependencies (.venv), then run ruff, mypy
# and the test suite.
# The same command runs in CI (.ci/run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/system-deps.sh  # curl, python3-venv and nginx (apt-get, as root, when missing)
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest -q "$@"
