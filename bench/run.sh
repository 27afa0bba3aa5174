#!/usr/bin/env bash
# Outrigger benchmark: installs nginx and wrk when missing (as root, via apt-get), then runs
# bench/bench.py with any arguments given here (see `bench/run.sh --help`).
# Everything listens on 127.0.0.1; every process started is stopped at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
have nginx || missing+=(nginx)
have wrk || missing+=(wrk)

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
        for pkg in "${missing[@]}"; do
            apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null \
                || echo "could not install $pkg" >&2
        done
        if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    else
        echo "missing ${missing[*]} and not root (or no apt-get): install them yourself" >&2
    fi
fi

if ! have nginx; then
    echo "nginx is required (it is the upstream and the comparison proxy)" >&2
    exit 1
fi
if ! have wrk; then
    echo "wrk unavailable: falling back to the Python load generator (much slower client)" >&2
fi

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$repo/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$repo/.venv/bin/activate"
fi
if ! command -v outrigger >/dev/null 2>&1; then
    echo "outrigger not on PATH: pip install -e . in the repo's virtualenv first" >&2
    exit 1
fi

extra=()
if [ "${BENCH_UVLOOP:-0}" = 1 ]; then
    # Optional: also measure Outrigger's "full" config under uvloop. Installed into a
    # cache folder (not the project's virtualenv) and put on PYTHONPATH for that one process.
    uvloop_dir="${XDG_CACHE_HOME:-$HOME/.cache}/outrigger-bench/uvloop"
    if [ ! -d "$uvloop_dir/uvloop" ]; then
        python -m pip install --quiet --disable-pip-version-check --target "$uvloop_dir" uvloop \
            || echo "could not install uvloop: skipping the uvloop target" >&2
    fi
    if [ -d "$uvloop_dir/uvloop" ]; then extra+=(--uvloop-path "$uvloop_dir"); fi
fi

cd "$repo"
# What the report prints as the command to reproduce this run.
prefix=""
if [ "${BENCH_UVLOOP:-0}" = 1 ]; then prefix="BENCH_UVLOOP=1 "; fi
export BENCH_COMMAND="${prefix}bench/run.sh${*:+ $*}"
exec python "$here/bench.py" "${extra[@]}" "$@"
