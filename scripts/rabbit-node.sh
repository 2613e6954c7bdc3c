#!/usr/bin/env bash
# One private RabbitMQ node, for tests and benchmarks that stop, kill or
# cluster a broker. The machine's own node (rabbit@localhost, port 5672) is
# never touched: every rabbitmqctl call names its node with -n.
#
# Each node lives in its own directory (data, logs, pid file, config), owned
# by the rabbitmq user, under $PIGEON_RABBIT_BASE (default /tmp/pigeon-rabbitmq):
#   $PIGEON_RABBIT_BASE/NAME/{mnesia,log,rabbit.pid,rabbitmq.conf,enabled_plugins}
# No plugins are enabled (the management port belongs to the machine's node).
# A node that finds itself cut off from the majority of its cluster pauses
# until it sees them again (pause_minority), so a partition heals by itself.
# The nodes share the rabbitmq user's Erlang cookie, as rabbitmqctl does when
# it runs as that user (the Debian wrapper switches to it when called as root).
#
# Usage:
#   scripts/rabbit-node.sh start NAME AMQP_PORT [DIST_PORT]  start (idempotent), wait until up
#   scripts/rabbit-node.sh stop NAME                         stop gracefully (idempotent)
#   scripts/rabbit-node.sh kill NAME                         kill -9 the node's OS process
#   scripts/rabbit-node.sh pid NAME                          the node's OS pid (exit 1 if down)
#   scripts/rabbit-node.sh status NAME                       "NAME@localhost up|down"
#   scripts/rabbit-node.sh wipe NAME                         stop, then delete its directory
# NAME is the short node name (pigeon1 → pigeon1@localhost). DIST_PORT defaults
# to AMQP_PORT + 20000.
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
readonly BASE=${PIGEON_RABBIT_BASE:-/tmp/pigeon-rabbitmq}
readonly START_TIMEOUT=${PIGEON_RABBIT_START_TIMEOUT:-120}

say() { printf 'rabbit-node: %s\n' "$*"; }
die() {
    printf 'rabbit-node: error: %s\n' "$*" >&2
    exit 1
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

node_of() { printf '%s@localhost' "$1"; }
dir_of() { printf '%s/%s' "$BASE" "$1"; }

ctl() {
    local name=$1
    shift
    rabbitmqctl -n "$(node_of "$name")" "$@"
}

# The OS pid of a running node, from its pid file; nothing (exit 1) if it is not running.
# A node killed with -9 stays a zombie until PID 1 reaps it (seconds, in a container),
# and kill -0 still finds a zombie: it counts as stopped, or `start` would wait for it.
node_pid() {
    local file pid state
    file="$(dir_of "$1")/rabbit.pid"
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] && alive "$pid" || return 1
    printf '%s\n' "$pid"
}

# Whether process $1 runs: it exists and is not a zombie.
alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    [[ -n $state && $state != Z && $state != X ]]
}

write_files() {
    local name=$1 port=$2 dir
    dir=$(dir_of "$name")
    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$port
loopback_users.guest = true
log.console = false
log.file.level = warning
cluster_partition_handling = pause_minority
net_ticktime = 10
EOF
    echo '[].' >"$dir/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$dir"
}

# rabbitmq-server and rabbitmqctl with this node's environment. The Debian
# wrappers switch to the rabbitmq user and keep RABBITMQ_* variables.
with_env() {
    local name=$1 port=$2 dist=$3 dir
    shift 3
    dir=$(dir_of "$name")
    env RABBITMQ_NODENAME="$(node_of "$name")" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$port" \
        RABBITMQ_DIST_PORT="$dist" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_PID_FILE="$dir/rabbit.pid" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        "$@"
}

start() {
    local name=$1 port=$2 dist=${3:-$(($2 + 20000))}
    [[ $port != 5672 ]] || die "5672 is the machine's own node; pick another port"
    command -v rabbitmq-server >/dev/null ||
        die "rabbitmq-server is not installed: run scripts/ensure-services.sh rabbitmq"
    if ! node_pid "$name" >/dev/null; then
        write_files "$name" "$port"
        rm -f "$(dir_of "$name")/rabbit.pid"
        # A pipe on stdout/stderr would kill the detached node when it closes.
        with_env "$name" "$port" "$dist" rabbitmq-server -detached >/dev/null 2>&1
    fi
    if ! ctl "$name" wait "$(dir_of "$name")/rabbit.pid" --timeout "$START_TIMEOUT" >/dev/null 2>&1; then
        die "$(node_of "$name") did not start within ${START_TIMEOUT}s; see $(dir_of "$name")/log"
    fi
}

stop() {
    local name=$1 pid
    pid=$(node_pid "$name") || return 0
    ctl "$name" stop "$(dir_of "$name")/rabbit.pid" >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do
        alive "$pid" || return 0
        sleep 1
    done
    kill -9 "$pid" 2>/dev/null || true
}

main() {
    local cmd=${1:-}
    case $cmd in
    start)
        [[ $# -ge 3 ]] || die "usage: rabbit-node.sh start NAME AMQP_PORT [DIST_PORT]"
        start "$2" "$3" "${4:-}"
        ;;
    stop) stop "${2:?NAME}" ;;
    kill)
        local pid
        pid=$(node_pid "${2:?NAME}") || return 0
        kill -9 "$pid"
        ;;
    pid) node_pid "${2:?NAME}" ;;
    status)
        if node_pid "${2:?NAME}" >/dev/null; then
            echo "$(node_of "$2") up"
        else
            echo "$(node_of "$2") down"
        fi
        ;;
    wipe)
        stop "${2:?NAME}"
        rm -rf "$(dir_of "$2")"
        ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
