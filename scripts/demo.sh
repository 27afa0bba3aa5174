#!/usr/bin/env bash
# Outrigger demo: a misbehaving upstream on 127.0.0.1:8080, Outrigger in front
# of it, and a few curl calls that show proxying, retries and the allowlist.
#
# Usage (from the repo root):   scripts/demo.sh
#   DEMO_EXIT=1 scripts/demo.sh   run the steps, then stop both processes
#
# Needs only python3 (with the venv module; on Debian: apt-get install
# python3-venv) and curl. Uses config.example.yaml, which routes the host
# demo.local (and the dedicated port 9001) to http://127.0.0.1:8080.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
UPSTREAM_PORT=8080
DEDICATED_PORT=9001
MAIN=http://127.0.0.1:15001
ADMIN=http://127.0.0.1:15000
CONFIG=config.example.yaml

UPSTREAM_PID=""
OUTRIGGER_PID=""
TAIL_PID=""
LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/outrigger-demo.XXXXXX")"

say()  { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }
show() { printf '\n$ %s\n' "$*"; }

# Direct calls must not go through a proxy the user may have set in the
# environment (http_proxy etc.); the forward-proxy step passes -x itself.
direct() { curl -sS --noproxy '*' --max-time 15 "$@"; }
viaproxy() { curl -sS --max-time 15 -x "$MAIN" "$@"; }

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "$TAIL_PID" "$OUTRIGGER_PID" "$UPSTREAM_PID"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    # Outrigger drains in-flight requests on SIGTERM; give both a moment.
    for pid in "$OUTRIGGER_PID" "$UPSTREAM_PID"; do
        if [[ -n "$pid" ]]; then
            wait "$pid" 2>/dev/null || true
        fi
    done
    printf '\nStopped. Logs kept in %s\n' "$LOG_DIR"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
    printf '\nerror: %s\n' "$*" >&2
    exit 1
}

port_free() {
    "$VENV/bin/python" - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
}

# --- 0. environment -------------------------------------------------------
command -v python3 >/dev/null || fail "python3 is required"
command -v curl >/dev/null || fail "curl is required"
[[ -f pyproject.toml && -f "$CONFIG" ]] || fail "run from the Outrigger repo root (no $CONFIG here)"

if [[ ! -x "$VENV/bin/python" ]]; then
    say "Creating a virtualenv in $VENV"
    python3 -m venv "$VENV" || fail "python3 -m venv failed; on Debian/Ubuntu: sudo apt-get install python3-venv, then rm -rf $VENV and retry"
fi
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
    || fail "$VENV has no pip (created without ensurepip?); rm -rf $VENV and retry"

say "Installing Outrigger into $VENV (pip install -e .)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e .

for port in "$UPSTREAM_PORT" "$DEDICATED_PORT" 15000 15001; do
    port_free "$port" || fail "port $port on 127.0.0.1 is already in use (an earlier demo still running?)"
done

# --- 1. start the upstream and Outrigger ----------------------------------
say "Starting the demo upstream on 127.0.0.1:$UPSTREAM_PORT (log: $LOG_DIR/upstream.log)"
"$VENV/bin/python" demo/upstream.py --port "$UPSTREAM_PORT" >"$LOG_DIR/upstream.log" 2>&1 &
UPSTREAM_PID=$!

say "Starting Outrigger: outrigger run -c $CONFIG (log: $LOG_DIR/outrigger.log)"
"$VENV/bin/outrigger" run -c "$CONFIG" >"$LOG_DIR/outrigger.log" 2>&1 &
OUTRIGGER_PID=$!

note "waiting for $ADMIN/readyz ..."
ready=""
for _ in $(seq 1 50); do
    kill -0 "$UPSTREAM_PID" 2>/dev/null || { cat "$LOG_DIR/upstream.log" >&2; fail "the demo upstream exited"; }
    kill -0 "$OUTRIGGER_PID" 2>/dev/null || { cat "$LOG_DIR/outrigger.log" >&2; fail "outrigger exited"; }
    code="$(curl -s --noproxy '*' --max-time 1 -o /dev/null -w '%{http_code}' "$ADMIN/readyz" || true)"
    if [[ "$code" == "200" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$UPSTREAM_PORT") 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.2
done
[[ -n "$ready" ]] || { tail -n 20 "$LOG_DIR/outrigger.log" >&2; fail "Outrigger was not ready after 10 s"; }
note "ready."

# --- 2. the three ways an app reaches an upstream -------------------------
say "1/7  Dedicated port: the policy for demo.local has 'listen: $DEDICATED_PORT'"
note "The app just uses http://localhost:$DEDICATED_PORT as its base URL."
show "curl -s http://127.0.0.1:$DEDICATED_PORT/hello"
direct "http://127.0.0.1:$DEDICATED_PORT/hello" || note "(request failed)"
echo

say "2/7  Host header on the main listener (127.0.0.1:15001)"
note "The app sends a normal request to the main port; Host picks the policy."
show "curl -s -H 'Host: demo.local' $MAIN/hello"
direct -H 'Host: demo.local' "$MAIN/hello" || note "(request failed)"
echo

say "3/7  Forward proxy: the app sets HTTP_PROXY=$MAIN and uses http:// URLs"
note "Outrigger then decides whether the real upstream gets HTTP or HTTPS."
show "curl -s -x $MAIN http://demo.local/hello"
viaproxy http://demo.local/hello || note "(request failed)"
echo

# --- 3. retries ------------------------------------------------------------
say "4/7  Retries: /flaky fails with 503 twice, then succeeds, over and over"
note "The app sees one 200 per request; x-outrigger-attempts says how many"
note "attempts Outrigger made to get it."
for i in 1 2 3; do
    show "curl -s -D - http://127.0.0.1:$DEDICATED_PORT/flaky   (request $i)"
    direct -D - -o /dev/null "http://127.0.0.1:$DEDICATED_PORT/flaky" | tr -d '\r' | awk '
        NR == 1 { status = $2 }
        tolower($1) == "x-outrigger-attempts:" { attempts = $2 }
        END { printf "    status %s, x-outrigger-attempts: %s\n", status, (attempts == "" ? "(missing)" : attempts) }
    ' || note "(request failed)"
done

say "5/7  What the upstream saw: its own call counts (direct, not via Outrigger)"
note "/flaky was called about 3x as often as the app asked: those are the retries."
show "curl -s http://127.0.0.1:$UPSTREAM_PORT/stats"
direct "http://127.0.0.1:$UPSTREAM_PORT/stats" || note "(request failed)"
echo

# --- 4. circuit breaker -----------------------------------------------------
say "6/7  Circuit breaker: /down always answers 503"
note "After 5 failed attempts in a row the breaker opens: Outrigger answers 503 circuit_open"
note "at once, with Retry-After, without touching the upstream (it half-opens after 10 s)."
for i in 1 2 3 4; do
    show "curl -s -D - http://127.0.0.1:$DEDICATED_PORT/down   (request $i)"
    direct -D - -o /dev/null "http://127.0.0.1:$DEDICATED_PORT/down" | tr -d '\r' | awk '
        NR == 1 { status = $2 }
        tolower($1) == "x-outrigger-attempts:" { attempts = $2 }
        tolower($1) == "x-outrigger-error:" { error = $2 }
        END { printf "    status %s, attempts %s%s\n", status, (attempts == "" ? "-" : attempts), (error == "" ? "" : ", x-outrigger-error: " error) }
    ' || note "(request failed)"
done
show "curl -s $ADMIN/state"
direct "$ADMIN/state" || note "(request failed)"
echo

# --- 5. egress allowlist -----------------------------------------------------
say "7/7  Egress allowlist: a host without a policy is refused (unknown_hosts: deny)"
show "curl -s -x $MAIN http://example.com/"
viaproxy -w '\n    -> HTTP %{http_code}\n' http://example.com/ || note "(request failed)"

# --- 6. more to try ----------------------------------------------------------
say "More to try in another terminal"
cat <<TRY
    curl -si http://127.0.0.1:$DEDICATED_PORT/ratelimited   # 429 + Retry-After: 1, retried after 1 s
    curl -si 'http://127.0.0.1:$DEDICATED_PORT/slow?ms=15000'  # per-try / total timeouts -> 504
    curl -s -X POST -d '{"a":1}' http://127.0.0.1:$DEDICATED_PORT/echo   # headers Outrigger sent
    curl -s $ADMIN/state      # breaker, budget and limiter state per policy
    curl -s $ADMIN/metrics    # Prometheus metrics
    curl -s $ADMIN/config     # effective config (secrets redacted)
TRY

if [[ "${DEMO_EXIT:-0}" == "1" ]]; then
    exit 0
fi

say "Both are running; their logs follow. Press Ctrl-C to stop them."
tail -n 0 -f "$LOG_DIR/upstream.log" "$LOG_DIR/outrigger.log" &
TAIL_PID=$!
while kill -0 "$UPSTREAM_PID" 2>/dev/null && kill -0 "$OUTRIGGER_PID" 2>/dev/null; do
    sleep 1
done
fail "a process exited on its own; see the logs in $LOG_DIR"
