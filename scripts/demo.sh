#!/usr/bin/env bash
# The order story under supervisor: `make demo`, `make demo-status`, `make demo-stop`.
#
#   scripts/demo.sh start    declare the topology, start supervisord (restarting a running
#                            one), wait until every program runs, place orders, wait for
#                            the story to play out and say where to look
#   scripts/demo.sh status   the programs, LetterThief's health, what the story produced
#   scripts/demo.sh stop     stop every program, then supervisord
#
# Environment:
#   DEMO_PORT=8025         LetterThief's port (when 8025 is taken)
#   DEMO_ORDERS=20         orders to place, of which
#   DEMO_FAILING=3         go to eu-north, a region no delivery partner serves
#   DEMO_TIMEOUT=60        seconds to wait for the programs, then for the story
#   PIGEON_URL, PIGEON_EXCHANGE, ...   the bus, as for any pigeon program; the
#                          listeners inherit them from supervisord, which inherits
#                          them from here
set -euo pipefail
cd "$(dirname "$0")/.."

readonly ROOT=$PWD
readonly BIN=$ROOT/.venv/bin
readonly CONF=$ROOT/supervisord.conf
readonly VAR=$ROOT/var
readonly OVERRIDE=$VAR/supervisord.d/demo.conf
readonly PIDFILE=$VAR/supervisord.pid
readonly MAIL=$VAR/mail
readonly PORT=${DEMO_PORT:-8025}
readonly ORDERS=${DEMO_ORDERS:-20} FAILING=${DEMO_FAILING:-3}
readonly TIMEOUT=${DEMO_TIMEOUT:-60}
readonly FAILING_REGION=eu-north
readonly APPS=(notification seller logistics)

# Each program gets its own PIGEON_SERVICE from supervisord.conf; one set in
# this shell would give every service the same name.
unset PIGEON_SERVICE

say() { printf 'demo: %s\n' "$*"; }
die() {
    printf 'demo: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<'EOF'
Usage: scripts/demo.sh start|status|stop

  start    run the order story under supervisor and place orders (make demo)
  status   show the programs and what the story produced     (make demo-status)
  stop     stop the programs and supervisord                  (make demo-stop)
EOF
}

ctl() { "$BIN/supervisorctl" -c "$CONF" "$@"; }

supervisord_running() { ctl pid >/dev/null 2>&1; }

port_answers() { timeout 2 bash -c ": </dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# conf_value NAME: a value from supervisord.conf's environment= lines (the demo login).
conf_value() {
    sed -n "s/.*$1=\"\\([^\"]*\\)\".*/\\1/p" "$CONF" | head -n 1
}

# The port LetterThief was started with: the override's, else supervisord.conf's.
current_port() {
    local port
    port=$(sed -n 's/^command=.*letterthief serve.*--port \([0-9]*\).*/\1/p' "$OVERRIDE" 2>/dev/null || true)
    [[ -n $port ]] || port=$(sed -n 's/^command=.*letterthief serve.*--port \([0-9]*\).*/\1/p' "$CONF")
    printf '%s\n' "$port"
}

# http_ok URL: LetterThief's /healthz answers 200.
http_ok() {
    "$BIN/python" - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.status == 200 else 1)
PY
}

write_override() {
    mkdir -p "$(dirname "$OVERRIDE")"
    {
        printf '; Written by scripts/demo.sh on each `make demo`; local changes are lost.\n'
        if [[ $PORT != 8025 ]]; then
            printf '; DEMO_PORT=%s: LetterThief on another port.\n[program:letterthief]\n' "$PORT"
            grep '^command=.*letterthief serve' "$CONF" |
                sed -e "s|%(here)s|$ROOT|g" -e "s|--port [0-9]*|--port $PORT|"
        fi
    } >"$OVERRIDE"
}

# wait_running: until every program is RUNNING; a FATAL one ends the wait with its log.
wait_running() {
    local deadline=$((SECONDS + TIMEOUT)) out name state
    while :; do
        out=$(ctl status 2>&1 || true)
        if grep -q 'FATAL' <<<"$out"; then
            printf '%s\n' "$out" >&2
            while read -r name state _; do
                [[ $state == FATAL ]] || continue
                printf '\n--- var/log of %s (last lines) ---\n' "$name" >&2
                tail -n 15 "$VAR/log/${name#*:}.log" >&2 2>/dev/null || true
            done <<<"$out"
            die "a program could not start (above); fix it, then run make demo again"
        fi
        if [[ -n $out ]] && ! grep -qv ' RUNNING ' <<<"$out"; then
            return 0
        fi
        ((SECONDS < deadline)) || {
            printf '%s\n' "$out" >&2
            die "not every program was RUNNING after ${TIMEOUT}s; see var/log/"
        }
        sleep 1
    done
}

wait_healthy() {
    local deadline=$((SECONDS + TIMEOUT))
    until http_ok "http://127.0.0.1:$PORT/healthz"; do
        ((SECONDS < deadline)) ||
            die "LetterThief did not answer http://127.0.0.1:$PORT/healthz within ${TIMEOUT}s;" \
                "see var/log/letterthief.log"
        sleep 0.5
    done
}

# watch_story OK_IDS FAILING_IDS: wait until every order has its confirmation,
# the partnered ones their tracking email, and the others a letter in LetterThief.
watch_story() {
    "$BIN/python" - "$MAIL" "$1" "$2" "http://127.0.0.1:$PORT" \
        "$(conf_value LETTERTHIEF_USERNAME)" "$(conf_value LETTERTHIEF_PASSWORD)" "$TIMEOUT" <<'PY'
import base64, json, sys, time, urllib.parse, urllib.request
from pathlib import Path

mail, ok_ids, failing_ids, url, user, password, timeout = sys.argv[1:]
mail = Path(mail)
ok, failing = ok_ids.split(), failing_ids.split()
auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def in_letterthief(order_id: str) -> bool:
    query = urllib.parse.urlencode({"q": order_id, "status": "open"})
    request = urllib.request.Request(f"{url}/api/dead-letters?{query}", headers={"Authorization": auth})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)["total"] > 0
    except (OSError, ValueError, KeyError):  # not answering yet: ask again
        return False


def counts() -> tuple[int, int, int]:
    confirmed = sum((mail / f"{o}.confirmation.eml").exists() for o in ok + failing)
    tracked = sum((mail / f"{o}.tracking.eml").exists() for o in ok)
    lettered = sum(in_letterthief(o) for o in failing)
    return confirmed, tracked, lettered


deadline = time.monotonic() + float(timeout)
while True:
    confirmed, tracked, lettered = done = counts()
    if done == (len(ok) + len(failing), len(ok), len(failing)) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(
    f"  {confirmed}/{len(ok) + len(failing)} confirmation emails, "
    f"{tracked}/{len(ok)} tracking emails, "
    f"{lettered}/{len(failing)} orders waiting in LetterThief"
)
sys.exit(0 if done == (len(ok) + len(failing), len(ok), len(failing)) else 1)
PY
}

# place COUNT [REGION]: prints the order lines, collects the ids in PLACED.
place() {
    local out
    out=$(PIGEON_LOG_LEVEL=${PIGEON_LOG_LEVEL:-WARNING} \
        "$BIN/python" -m listeners.orders place --count "$1" ${2:+--region "$2"}) ||
        die "placing orders failed (above); is RabbitMQ up? (scripts/ensure-services.sh rabbitmq)"
    printf '%s\n' "$out" | sed 's/^/  /'
    PLACED=$(cut -d' ' -f1 <<<"$out" | tr '\n' ' ')
}

do_stop() {
    local pid
    if ! supervisord_running; then
        if [[ -f $PIDFILE ]] && pid=$(<"$PIDFILE") && kill -0 "$pid" 2>/dev/null; then
            say "supervisord (pid $pid) does not answer on var/supervisor.sock; sending SIGTERM"
            kill -TERM "$pid"
        else
            say "not running"
            return 0
        fi
    else
        pid=$(ctl pid)
        say "stopping every program, then supervisord (pid $pid)"
        ctl shutdown >/dev/null
    fi
    # Listeners drain their work in flight (up to 20 s) before they exit.
    local deadline=$((SECONDS + 90))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || die "supervisord (pid $pid) still runs after 90s"
        sleep 0.2
    done
    say "stopped"
}

do_start() {
    local started=$SECONDS
    [[ -x $BIN/supervisord && -x $BIN/pigeon ]] || die "no $BIN/supervisord; run make install"
    if supervisord_running; then
        say "already running: restarting it"
        do_stop
    fi
    [[ $PORT =~ ^[0-9]+$ ]] || die "DEMO_PORT must be a port number, not '$PORT'"
    if port_answers "$PORT"; then
        die "port $PORT is taken by another program; run DEMO_PORT=8026 make demo"
    fi

    mkdir -p "$VAR/log" "$MAIL"
    write_override
    # Every run tells the same story: eu-north has no delivery partner (yet).
    cp listeners/partners.json "$VAR/partners.json"

    say "declaring the exchanges and queues of ${APPS[*]} (pigeon topology declare)"
    local app out
    for app in "${APPS[@]}"; do
        if ! out=$(PIGEON_SERVICE=$app "$BIN/pigeon" topology declare "listeners.$app:app" 2>&1); then
            printf '%s\n' "$out" | tail -n 5 >&2
            die "pigeon topology declare listeners.$app:app failed (above); is RabbitMQ up?"
        fi
        printf '%s\n' "$out" >>"$VAR/log/topology.log"
    done

    say "starting supervisord (supervisord.conf); waiting until every program is RUNNING"
    "$BIN/supervisord" -c "$CONF"
    wait_running
    wait_healthy
    ctl status | sed 's/^/  /'

    local good=$((ORDERS - FAILING)) ok_ids failing_ids
    say "placing $ORDERS orders: $good to regions with a delivery partner, $FAILING to" \
        "$FAILING_REGION, which has none"
    place "$good"
    ok_ids=$PLACED
    place "$FAILING" "$FAILING_REGION"
    failing_ids=$PLACED

    say "waiting for the story to play out (the $FAILING_REGION orders are tried 3 times first)"
    watch_story "$ok_ids" "$failing_ids" ||
        die "the story did not complete within ${TIMEOUT}s; see var/log/ and make demo-status"

    cat <<EOF

The order story is running (ready in $((SECONDS - started)) s).

  LetterThief  http://127.0.0.1:$PORT   login: $(conf_value LETTERTHIEF_USERNAME) / $(conf_value LETTERTHIEF_PASSWORD)
               The $FAILING $FAILING_REGION orders wait there: NoPartnerForRegion, after 3 attempts.
  Fix them     .venv/bin/python -m listeners.logistics add-partner $FAILING_REGION PostNord
               then open their failure group in LetterThief and press "Retry all":
               each order gets its tracking email.
  Emails       ls var/mail/   (one .eml per email; open one in any mail client)
  Processes    make demo-status   (or: .venv/bin/supervisorctl -c supervisord.conf status)
  Logs         tail -f var/log/logistics-0.log   (JSON, one event per line)
  More orders  .venv/bin/python -m listeners.orders place --count 5 [--region $FAILING_REGION]
  Stop         make demo-stop
EOF
}

do_status() {
    if ! supervisord_running; then
        say "not running (make demo starts it)"
        return 0
    fi
    ctl status || true # exits 3 when a program is not RUNNING: that is what we show
    local port health emails letters
    port=$(current_port)
    if http_ok "http://127.0.0.1:$port/healthz"; then health=healthy; else health="NOT healthy"; fi
    emails=$(find "$MAIL" -name '*.eml' 2>/dev/null | wc -l)
    letters=$("$BIN/python" - "http://127.0.0.1:$port" "$(conf_value LETTERTHIEF_USERNAME)" \
        "$(conf_value LETTERTHIEF_PASSWORD)" <<'PY' 2>/dev/null || echo "?"
import base64, json, sys, urllib.request
url, user, password = sys.argv[1:]
auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
request = urllib.request.Request(f"{url}/api/dead-letters?status=open&limit=1", headers={"Authorization": auth})
with urllib.request.urlopen(request, timeout=5) as response:
    print(json.load(response)["total"])
PY
)
    printf '\nLetterThief  http://127.0.0.1:%s  %s, %s open letter(s)\n' "$port" "$health" "$letters"
    printf 'Emails       %s in var/mail/\n' "$emails"
    printf 'Logs         var/log/\n'
}

main() {
    case ${1:-} in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    -h | --help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
