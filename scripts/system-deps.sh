#!/usr/bin/env bash
# System packages the tests need (curl, python3-venv, nginx, redis-server), installed with apt-get
# when missing and running as root; otherwise says what to install. Never lets the nginx or
# redis-server package start a system nginx on port 80 or a system redis on port 6379: the tests
# start their own on loopback ports (a policy-rc.d that forbids every service start while apt-get runs).
set -euo pipefail

have_nginx() { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; }
have_redis() { command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ]; }
have_all() {
    command -v curl >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null && have_nginx && have_redis
}

have_all && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "the tests need curl, python3-venv, nginx and redis-server: install them" \
        "(e.g. apt-get install curl python3-venv nginx redis-server)" >&2
    exit 1
fi
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when apt-get fails
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends curl python3-venv nginx redis-server >/dev/null
