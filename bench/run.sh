#!/usr/bin/env bash
# Outrigger benchmark, one command: installs nginx, wrk and hey (apt-get, as root) and the
# project's .venv with matplotlib when missing, then runs bench/bench.py with any arguments
# given here (`bench/run.sh --help`). Full run ~8 min on 2 cores; `--quick` ~2 min.
# Everything listens on 127.0.0.1; every process started is stopped at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
for tool in nginx wrk hey; do have "$tool" || missing+=("$tool"); done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing: ${missing[*]}" >&2
        # Never let the package start a system nginx on port 80: a policy-rc.d that
        # refuses service starts, added only for this install if none exists.
        added_policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            added_policy=1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || echo "apt-get update failed" >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || echo "could not install ${missing[*]}" >&2
        if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    else
        echo "missing ${missing[*]} and not root (or no apt-get): install them yourself" >&2
    fi
fi
for tool in nginx wrk hey; do
    if ! have "$tool"; then
        echo "$tool is required (nginx: origin and comparison proxy; wrk: throughput; hey: paced latency)" >&2
        exit 1
    fi
done

if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x "$repo/.venv/bin/python" ]; then
        python3 -m venv "$repo/.venv"
        "$repo/.venv/bin/pip" install --quiet --disable-pip-version-check -e "$repo"
    fi
    # shellcheck disable=SC1091
    . "$repo/.venv/bin/activate"
fi
if ! python -c "import matplotlib" >/dev/null 2>&1; then
    python -m pip install --quiet --disable-pip-version-check matplotlib
fi
if ! command -v outrigger >/dev/null 2>&1; then
    echo "outrigger not on PATH: pip install -e . in the active virtualenv first" >&2
    exit 1
fi

cd "$repo"
# What the report prints as the command to reproduce this run (its arguments appended).
export BENCH_COMMAND="bench/run.sh"
exec python "$here/bench.py" "$@"
