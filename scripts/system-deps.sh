#!/usr/bin/env bash
# System packages the tests need (curl, python3-venv, nginx), installed with apt-get when missing
# and running as root; otherwise says what to install. Never lets the nginx package start a system
# nginx on port 80: the tests start their own on loopback ports.
set -euo pipefail

have_nginx() { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; }
have_all() { command -v curl >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null && have_nginx; }

have_all && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "the tests need curl, python3-venv and nginx: install them (e.g. apt-get install curl python3-venv nginx)" >&2
    exit 1
fi
added_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends curl python3-venv nginx >/dev/null
if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
