#!/usr/bin/env bash
# Outrigger demo: a misbehaving upstream on 127.0.0.1:8080 (and a standby
# "region" on 8081), Outrigger in front of it, a trace printer on 4318, and a
# few curl calls that show proxying, retries, the circuit breaker, the rate
# limiter, a stale cache answer, failover and the allowlist - each with the
# trace Outrigger exported for it, printed as a tree.
#
# Usage (from the repo root):   scripts/demo.sh
#   DEMO_EXIT=1 scripts/demo.sh   run the steps, then stop every process
#
# Needs only python3 (with the venv module; on Debian: apt-get install
# python3-venv) and curl. Uses config.example.yaml, whose policies/demo.yaml
# routes demo.local (and the dedicated port 9001), limited.demo.local,
# catalog.demo.local and failover.demo.local to the demo upstream.
#
# To add a step: write a step_* function (start it with `title`, end it with
# `traces`), and add its name to STEPS below.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
UPSTREAM_PORT=8080
STANDBY_PORT=8081
DEDICATED_PORT=9001
TRACES_PORT=4318
MAIN=http://127.0.0.1:15001
ADMIN=http://127.0.0.1:15000
CONFIG=config.example.yaml

UPSTREAM_PID=""
TRACES_PID=""
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
    for pid in "$TAIL_PID" "$OUTRIGGER_PID" "$UPSTREAM_PID" "$TRACES_PID"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    # Outrigger drains in-flight requests on SIGTERM; give them a moment.
    for pid in "$OUTRIGGER_PID" "$UPSTREAM_PID" "$TRACES_PID"; do
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

for port in "$UPSTREAM_PORT" "$STANDBY_PORT" "$DEDICATED_PORT" "$TRACES_PORT" 15000 15001; do
    port_free "$port" || fail "port $port on 127.0.0.1 is already in use (an earlier demo still running?)"
done

# --- 1. start the upstream and Outrigger ----------------------------------
say "Starting the demo upstream on 127.0.0.1:$UPSTREAM_PORT, standby region on :$STANDBY_PORT (log: $LOG_DIR/upstream.log)"
"$VENV/bin/python" demo/upstream.py --port "$UPSTREAM_PORT" --standby-port "$STANDBY_PORT" >"$LOG_DIR/upstream.log" 2>&1 &
UPSTREAM_PID=$!

TRACES="$LOG_DIR/traces.log"
say "Starting the trace printer (OTLP/HTTP) on 127.0.0.1:$TRACES_PORT (log: $TRACES)"
"$VENV/bin/python" demo/traces.py --port "$TRACES_PORT" >"$TRACES" 2>"$LOG_DIR/traces.err" &
TRACES_PID=$!

say "Starting Outrigger: outrigger run -c $CONFIG (log: $LOG_DIR/outrigger.log)"
note "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT sends its traces to the printer (exported every 100 ms)."
NO_PROXY=127.0.0.1 no_proxy=127.0.0.1 OTEL_BSP_SCHEDULE_DELAY=100 \
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:$TRACES_PORT/v1/traces" \
    "$VENV/bin/outrigger" run -c "$CONFIG" >"$LOG_DIR/outrigger.log" 2>&1 &
OUTRIGGER_PID=$!

note "waiting for $ADMIN/readyz ..."
ready=""
for _ in $(seq 1 50); do
    kill -0 "$UPSTREAM_PID" 2>/dev/null || { cat "$LOG_DIR/upstream.log" >&2; fail "the demo upstream exited"; }
    kill -0 "$TRACES_PID" 2>/dev/null || { cat "$LOG_DIR/traces.err" >&2; fail "the trace printer exited"; }
    kill -0 "$OUTRIGGER_PID" 2>/dev/null || { cat "$LOG_DIR/outrigger.log" >&2; fail "outrigger exited"; }
    code="$(curl -s --noproxy '*' --max-time 1 -o /dev/null -w '%{http_code}' "$ADMIN/readyz" || true)"
    if [[ "$code" == "200" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$UPSTREAM_PORT") 2>/dev/null \
        && (exec 3<>"/dev/tcp/127.0.0.1/$STANDBY_PORT") 2>/dev/null \
        && (exec 3<>"/dev/tcp/127.0.0.1/$TRACES_PORT") 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.2
done
[[ -n "$ready" ]] || { tail -n 20 "$LOG_DIR/outrigger.log" >&2; fail "Outrigger was not ready after 10 s"; }
note "ready."


# --- 2. the steps ----------------------------------------------------------
STEP=0
TRACES_SEEN=0

title() {
    STEP=$((STEP + 1))
    say "$STEP/${#STEPS[@]}  $*"
}

# traces WANT [SHOW]: wait (at most 5 s) until the printer has WANT more traces, print the
# last SHOW of them (default: all), and mark them seen.
traces() {
    local want=$1 show=${2:-$1} have=0
    for _ in $(seq 1 50); do
        have=$(grep -c '^trace ' "$TRACES" || true)
        (( have >= TRACES_SEEN + want )) && break
        sleep 0.1
    done
    if (( show > 0 )); then
        printf '\n    The trace Outrigger exported (printed by demo/traces.py):\n\n'
        awk -v from=$((have - show + 1)) -v to="$have" -v seen="$TRACES_SEEN" \
            'BEGIN { RS = "" } NR >= from && NR <= to && NR > seen { if (n++) print ""; print }' "$TRACES" \
            | sed 's/^./      &/'
    fi
    (( have >= TRACES_SEEN + want )) || note "(expected $want new trace(s), got $((have - TRACES_SEEN)); see $TRACES)"
    TRACES_SEEN=$have
}

# status_line [HEADER...]: read a response head (curl -D -) and print its status and the named headers.
status_line() {
    tr -d '\r' | awk -v names="$*" '
        BEGIN { n = split(tolower(names), want, " ") }
        NR == 1 { status = $2 }
        { for (i = 1; i <= n; i++) if (tolower($1) == want[i] ":") value[i] = $2 }
        END {
            line = "    status " status
            for (i = 1; i <= n; i++) line = line ", " want[i] ": " (value[i] == "" ? "-" : value[i])
            print line
        }'
}

step_dedicated_port() {
    title "Dedicated port: the policy for demo.local has 'listen: $DEDICATED_PORT'"
    note "The app just uses http://localhost:$DEDICATED_PORT as its base URL."
    show "curl -s http://127.0.0.1:$DEDICATED_PORT/hello"
    direct "http://127.0.0.1:$DEDICATED_PORT/hello" || note "(request failed)"
    echo
    traces 1
}

step_host_header() {
    title "Host header on the main listener (127.0.0.1:15001)"
    note "The app sends a normal request to the main port; Host picks the policy."
    show "curl -s -H 'Host: demo.local' $MAIN/hello"
    direct -H 'Host: demo.local' "$MAIN/hello" || note "(request failed)"
    echo
    traces 1 0
}

step_forward_proxy() {
    title "Forward proxy: the app sets HTTP_PROXY=$MAIN and uses http:// URLs"
    note "Outrigger then decides whether the real upstream gets HTTP or HTTPS."
    show "curl -s -x $MAIN http://demo.local/hello"
    viaproxy http://demo.local/hello || note "(request failed)"
    echo
    traces 1 0
}

step_retries() {
    title "Retries: /flaky fails with 503 twice, then succeeds, over and over"
    note "The app sees one 200 per request; x-outrigger-attempts says how many"
    note "attempts Outrigger made to get it, and the trace shows each one."
    for i in 1 2 3; do
        show "curl -s -D - http://127.0.0.1:$DEDICATED_PORT/flaky   (request $i)"
        direct -D - -o /dev/null "http://127.0.0.1:$DEDICATED_PORT/flaky" | status_line x-outrigger-attempts \
            || note "(request failed)"
    done
    traces 3 1
    note "What the upstream saw (asked directly): /flaky was called 3x as often as the app asked."
    show "curl -s http://127.0.0.1:$UPSTREAM_PORT/stats"
    direct "http://127.0.0.1:$UPSTREAM_PORT/stats" || note "(request failed)"
    echo
}

step_breaker() {
    title "Circuit breaker: /down always answers 503"
    note "After 5 failed attempts in a row the breaker opens: Outrigger answers 503 circuit_open"
    note "at once, with Retry-After, without touching the upstream (it half-opens after 10 s)."
    local i
    for i in 1 2 3 4; do
        show "curl -s -D - http://127.0.0.1:$DEDICATED_PORT/down   (request $i)"
        direct -D - -o /dev/null "http://127.0.0.1:$DEDICATED_PORT/down" \
            | status_line x-outrigger-attempts x-outrigger-error || note "(request failed)"
        if (( i == 2 )); then
            note "Request 2: its second failed attempt was the fifth in a row, so the breaker opened"
            note "and the third attempt was never made; the app got the upstream's own 503."
            traces 2 1
        fi
    done
    traces 2 1
    show "curl -s $ADMIN/state   (per policy: breaker, retry budget, limiter, ...; here demo.local's breaker)"
    direct "$ADMIN/state" | "$VENV/bin/python" -c \
        'import json, sys; print(json.dumps(json.load(sys.stdin)["demo.local"]["circuit_breaker"]))' \
        || note "(request failed)"
}

step_rate_limit() {
    title "Rate limiter: limited.demo.local allows 2 requests per second, waiting at most 600 ms"
    note "Five requests at once: two go now, one waits for a token (500 ms), two would have to"
    note "wait longer than 600 ms and get 429 rate_limited with Retry-After, without an upstream call."
    show "5 x curl -s -D - -H 'Host: limited.demo.local' $MAIN/hello   (in parallel)"
    local i
    for i in 1 2 3 4 5; do
        direct -D "$LOG_DIR/limited.$i" -o /dev/null -H 'Host: limited.demo.local' "$MAIN/hello" &
    done
    wait_children
    for i in 1 2 3 4 5; do
        status_line x-outrigger-error retry-after <"$LOG_DIR/limited.$i"
    done
    traces 5
}

step_stale_cache() {
    title "Stale cache answer: catalog.demo.local caches /catalog, whose upstream then fails"
    note "The upstream answers /catalog once (fresh for 1 s), then only 503. Outrigger stores the"
    note "first answer, serves it from the cache, and once the upstream fails it answers with the"
    note "stale copy (x-outrigger-stale: true, for up to stale_if_error: 10m) instead of the 503."
    local i
    for i in 1 2 3; do
        if (( i == 3 )); then
            note "(waiting 1.5 s: the stored copy is now stale)"
            sleep 1.5
        fi
        show "curl -s -D - -H 'Host: catalog.demo.local' $MAIN/catalog   (request $i)"
        direct -D - -o /dev/null -H 'Host: catalog.demo.local' "$MAIN/catalog" \
            | status_line x-outrigger-cache x-outrigger-stale age || note "(request failed)"
    done
    traces 3
}

step_failover() {
    title "Failover: failover.demo.local's primary region (:$UPSTREAM_PORT) is down, a standby (:$STANDBY_PORT) is listed"
    note "An attempt that fails on the primary is retried on the standby; after 2 failures the"
    note "primary's own breaker opens and requests go straight to the standby."
    local i
    for i in 1 2 3; do
        show "curl -s -D - -H 'Host: failover.demo.local' $MAIN/region   (request $i)"
        direct -D - -o /dev/null -H 'Host: failover.demo.local' "$MAIN/region" \
            | status_line x-outrigger-attempts x-outrigger-upstream || note "(request failed)"
    done
    traces 3
}

step_fire_and_forget() {
    title "Fire-and-forget: outbox.demo.local stores a request sent with 'Prefer: respond-async'"
    note "Outrigger commits the request to its store (data_dir) and answers 202 at once, with the"
    note "delivery's id. A worker then delivers it through the policy: /orders is down for two"
    note "calls, so it is retried with backoff (the same Idempotency-Key every time) until it is"
    note "accepted. Stored deliveries survive restarts; GET $ADMIN/deliveries lists them."
    show "curl -s -D - -X POST -H 'Prefer: respond-async' -H 'Host: outbox.demo.local' $MAIN/orders -d '{\"kayaks\": 2}'"
    local head id state="" _
    head="$(direct -D - -o /dev/null -X POST -H 'Prefer: respond-async' -H 'Host: outbox.demo.local' \
        -H 'Content-Type: application/json' "$MAIN/orders" -d '{"kayaks": 2}')" || note "(request failed)"
    printf '%s\n' "$head" | status_line x-outrigger-delivery-id location
    id="$(printf '%s\n' "$head" | tr -d '\r' | awk 'tolower($1) == "x-outrigger-delivery-id:" { print $2 }')"
    if [[ -n "$id" ]]; then
        for _ in $(seq 1 50); do
            state="$(direct "$ADMIN/deliveries/$id" 2>/dev/null || true)"
            [[ "$state" == *'"state": "done"'* || "$state" == *'"state":"done"'* ]] && break
            sleep 0.1
        done
        show "curl -s $ADMIN/deliveries/$id"
        printf '%s\n' "$state" | "$VENV/bin/python" -c '
import json, sys
view = json.load(sys.stdin)
print("    state {state} after {attempts} attempts, last status {last_status}".format(**view))' \
            || note "(no delivery view)"
    fi
    traces 4
}

step_allowlist() {
    title "Egress allowlist: a host without a policy is refused (unknown_hosts: deny)"
    show "curl -s -x $MAIN http://example.com/"
    viaproxy -w '\n    -> HTTP %{http_code}\n' http://example.com/ || note "(request failed)"
    traces 1 0
}

# Background curls of one step; `wait` alone would also wait for the long-running processes.
wait_children() {
    local pid
    for pid in $(jobs -p); do
        case " $UPSTREAM_PID $TRACES_PID $OUTRIGGER_PID " in
            *" $pid "*) ;;
            *) wait "$pid" || true ;;
        esac
    done
}

STEPS=(
    step_dedicated_port
    step_host_header
    step_forward_proxy
    step_retries
    step_breaker
    step_rate_limit
    step_stale_cache
    step_failover
    step_fire_and_forget
    step_allowlist
)
for step in "${STEPS[@]}"; do
    "$step"
done

# --- 3. more to try ----------------------------------------------------------
say "More to try in another terminal"
cat <<TRY
    curl -si http://127.0.0.1:$DEDICATED_PORT/ratelimited   # 429 + Retry-After: 1, retried after 1 s
    curl -si 'http://127.0.0.1:$DEDICATED_PORT/slow?ms=15000'  # per-try / total timeouts -> 504
    curl -s -X POST -d '{"a":1}' http://127.0.0.1:$DEDICATED_PORT/echo   # headers Outrigger sent (Idempotency-Key)
    curl -s $ADMIN/state      # breaker, budget and limiter state per policy
    curl -s $ADMIN/metrics    # Prometheus metrics
    curl -s $ADMIN/config     # effective config (secrets redacted)
    .venv/bin/outrigger explain -c $CONFIG POST http://api.stripe.com/v1/charges   # a preset-built policy
TRY

if [[ "${DEMO_EXIT:-0}" == "1" ]]; then
    exit 0
fi

say "Everything is running; the logs and traces follow. Press Ctrl-C to stop."
tail -n 0 -f "$LOG_DIR/upstream.log" "$LOG_DIR/outrigger.log" "$TRACES" &
TAIL_PID=$!
while kill -0 "$UPSTREAM_PID" 2>/dev/null && kill -0 "$OUTRIGGER_PID" 2>/dev/null \
    && kill -0 "$TRACES_PID" 2>/dev/null; do
    sleep 1
done
fail "a process exited on its own; see the logs in $LOG_DIR"
