#!/usr/bin/env bash
# Build the Dockerfile with podman and run the image: /healthz, /readyz, the HEALTHCHECK, one
# request proxied through the container to a loopback upstream, a read-only root with a writable
# data_dir, and a clean SIGTERM exit.
#
# No Docker engine and no registry are needed: as root, the script installs podman, runc and
# debootstrap (apt-get) when missing, and when the Dockerfile's base image is not in local
# storage it builds a stand-in under that name (Debian bookworm with python3 and python3-venv,
# from the machine's own apt sources; bookworm's python3 is 3.11, as in the real base). The
# stand-in's root filesystem is cached as a tarball in $OUTRIGGER_CACHE (default
# ~/.cache/outrigger), so only the first run pays for debootstrap. pip inside the build reaches
# PyPI through the host network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
    echo "image-test.sh runs podman as root: run it as root" >&2
    exit 1
fi

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cache="${OUTRIGGER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outrigger}"
work="$(mktemp -d)"
container="outrigger-image-test-$$"
upstream_pid=""
cleanup() {
    podman rm --force --ignore "$container" >/dev/null 2>&1 || true
    [ -z "$upstream_pid" ] || kill "$upstream_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# podman without systemd or a container network: host network namespace, cgroupfs, runc, and
# explicit nofile/nproc limits: podman's defaults (1048576, 4194304) exceed what this machine
# lets us set, and runc cannot raise a limit without CAP_SYS_RESOURCE. nproc is capped lower
# than the shell's own limit, which runc was refused here too.
at_most() { local n; n="$(ulimit "-H$1")"; [ "$n" = unlimited ] || [ "$n" -gt "$2" ] && n="$2"; echo "$n"; }
nofile="$(at_most n 65536)"
nproc="$(at_most u 4096)"
cat >"$work/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$work/containers.conf"

base="$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)"
base_ref="docker.io/library/$base"

# The Debian mirror apt uses here (deb822 or one-line sources), so nothing names a host itself.
debian_mirror() {
    local uri
    uri="$(grep -hs -A3 '^Types: deb' /etc/apt/sources.list.d/*.sources |
        awk '/^URIs:/ {print $2}' | grep -v security | head -n1)"
    [ -n "$uri" ] || uri="$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)"
    [ -n "$uri" ] || { echo "no Debian mirror in the apt sources" >&2; exit 1; }
    echo "$uri"
}

stand_in() {
    local tarball="$cache/bookworm-python3-rootfs.tar"
    if [ ! -s "$tarball" ]; then
        mkdir -p "$cache"
        local root="$work/rootfs"
        echo "image-test: debootstrap of bookworm (python3, python3-venv) into $tarball"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$root" "$(debian_mirror)" >"$work/debootstrap.log" 2>&1 ||
            { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
        rm -rf "$root"
    fi
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        "$tarball" "$base_ref.debian" >/dev/null
    # This machine's trust store (it may hold a TLS-inspecting proxy's CA), so pip in the build
    # reaches PyPI as the host's pip does; pip's own certifi bundle would not know that CA.
    local box="$container-base"
    podman create --quiet --name "$box" "$base_ref.debian" >/dev/null
    podman cp /etc/ssl/certs/ca-certificates.crt "$box:/etc/ssl/certs/ca-certificates.crt"
    podman commit --quiet --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        "$box" "$base_ref" >/dev/null
    podman rm "$box" >/dev/null
    podman rmi "$base_ref.debian" >/dev/null
    echo "image-test: $base_ref is a local stand-in (Debian bookworm, $(podman run --rm "$base_ref" python3 -V))"
}
podman image exists "$base_ref" || stand_in

image="localhost/outrigger:image-test"
# --no-cache: buildah keys a cached RUN by its text, not by what a --mount=from=builder brings in,
# so a cached build would install the wheels of an older checkout (BuildKit has no such gap).
podman build --quiet --no-cache --format docker --network host --pull=never \
    --build-arg "PYTHON_IMAGE=$base_ref" -t "$image" . >/dev/null

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
main_port="$(free_port)"
admin_port="$(free_port)"
upstream_port="$(free_port)"

# The upstream: a static file on loopback.
mkdir -p "$work/www" "$work/etc/policies" "$work/data"
echo "hello through outrigger" >"$work/www/hello.txt"
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$upstream_port" >"$work/upstream.log" 2>&1 &
upstream_pid=$!

# The example config, on free ports (the container shares the host's network namespace), and one
# policy for the loopback upstream (private addresses are refused unless a policy allows them).
# data_dir goes on the volume, as in the image's own config and the chart's values.
sed -e "s/port: 15001/port: $main_port/" -e "s/port: 15000/port: $admin_port/" \
    -e "s|^data_dir: .*|data_dir: /var/lib/outrigger|" \
    config.example.yaml >"$work/etc/config.yaml"
cat >"$work/etc/policies/upstream.yaml" <<EOF
hosts: [upstream.test]
upstream: http://127.0.0.1:$upstream_port
allow_private_addresses: true
EOF
chown 10001:10001 "$work/data"

# Run it the way the chart does: read-only root, no capabilities, no privilege escalation.
# No health timer (it needs systemd; podman still logs that it has none, into podman.log): the
# check runs once below with `podman healthcheck run`.
podman run --detach --name "$container" --read-only --cap-drop ALL \
    --security-opt no-new-privileges --health-interval disable \
    -e "OUTRIGGER_HEALTHCHECK_URL=http://127.0.0.1:$admin_port/healthz" \
    -v "$work/etc:/etc/outrigger:ro" -v "$work/data:/var/lib/outrigger" \
    "$image" >/dev/null 2>"$work/podman.log"

fail() {
    echo "image-test: FAILED: $*" >&2
    cat "$work/podman.log" >&2
    podman logs "$container" 2>&1 | tail -n 30 >&2 || true
    exit 1
}
ready=""
for _ in $(seq 1 100); do
    if curl -sf -o /dev/null "http://127.0.0.1:$admin_port/readyz"; then ready=1; break; fi
    [ "$(podman inspect --format '{{.State.Running}}' "$container")" = true ] || fail "the container exited"
    sleep 0.2
done
[ -n "$ready" ] || fail "/readyz did not answer 200 within 20s"

check() {  # check NAME EXPECTED ACTUAL
    [ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"
    echo "image-test: ok: $1"
}
check "/healthz" 200 "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin_port/healthz")"
check "/readyz" 200 "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin_port/readyz")"
check "proxied body" "hello through outrigger" \
    "$(curl -sf -H 'Host: upstream.test' "http://127.0.0.1:$main_port/hello.txt")"
check "x-outrigger-attempts" 1 "$(curl -sf -o /dev/null -D - -H 'Host: upstream.test' \
    "http://127.0.0.1:$main_port/hello.txt" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-outrigger-attempts" {print $2}')"
# data_dir (SPEC 11) must be the image's volume: the default, beside the config, is read-only here.
check "data_dir on the volume" ok "$(curl -sf "http://127.0.0.1:$admin_port/config" | python3 -c '
import json, sys
main = json.load(sys.stdin)["main"]
print("ok" if main.get("data_dir", "/var/lib/outrigger") == "/var/lib/outrigger" else main["data_dir"])')"
check "HEALTHCHECK" 0 "$(podman healthcheck run "$container" >/dev/null 2>&1; echo $?)"
check "runs as" 10001 "$(podman exec "$container" id -u)"
check "read-only root" 1 "$(podman exec "$container" sh -c 'touch /opt/venv/x 2>/dev/null; echo $?')"
check "writable data_dir" 0 "$(podman exec "$container" sh -c 'touch /var/lib/outrigger/x; echo $?')"
check "fleet mode's redis client" ok "$(podman exec "$container" python -c 'import redis.asyncio; print("ok")')"
podman stop --time 30 "$container" >/dev/null 2>>"$work/podman.log"
check "exit code after SIGTERM (drain)" 0 "$(podman inspect --format '{{.State.ExitCode}}' "$container")"
echo "image-test: passed ($image on $base_ref)"
