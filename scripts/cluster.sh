#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for the cluster chaos tests,
# bench/cluster.py and anyone trying failover:
#   pigeon1@localhost  amqp://guest:guest@127.0.0.1:5701/
#   pigeon2@localhost  amqp://guest:guest@127.0.0.1:5702/
#   pigeon3@localhost  amqp://guest:guest@127.0.0.1:5703/
# Each node is a private node of scripts/rabbit-node.sh (own data directory
# under $PIGEON_RABBIT_BASE, default /tmp/pigeon-rabbitmq). The machine's own
# node on 5672 is never touched.
#
# Usage:
#   scripts/cluster.sh start    start the nodes and join them (idempotent); prints PIGEON_URL
#   scripts/cluster.sh stop     stop the nodes and delete their data (idempotent)
#   scripts/cluster.sh status   one line per node, and the cluster's running members
#   scripts/cluster.sh url      the PIGEON_URL of the cluster
#
# `stop` deletes the data: a cluster whose nodes were all stopped must be
# restarted in the reverse order, so a fresh one is both simpler and quicker.
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
HERE=$(cd "$(dirname "$0")" && pwd)
readonly NODE="$HERE/rabbit-node.sh"
readonly NAMES=(pigeon1 pigeon2 pigeon3)
readonly PORTS=(5701 5702 5703)
readonly SEED=pigeon1@localhost

say() { printf 'cluster: %s\n' "$*"; }
die() {
    printf 'cluster: error: %s\n' "$*" >&2
    exit 1
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

url() {
    local urls=() port
    for port in "${PORTS[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$port/"); done
    (
        IFS=,
        echo "${urls[*]}"
    )
}

# The running members of NAME's cluster, one per line.
running_nodes() {
    rabbitmqctl -n "$1@localhost" eval 'rabbit_nodes:all_running().' 2>/dev/null |
        grep -o "pigeon[0-9]*@localhost" || true
}

join() {
    local name=$1 node=$1@localhost
    if running_nodes "$name" | grep -qx "$SEED"; then
        return 0
    fi
    local step out
    for step in stop_app reset "join_cluster $SEED" start_app; do
        # shellcheck disable=SC2086  # the join step is two words on purpose
        out=$(rabbitmqctl -n "$node" $step 2>&1) || die "$node $step failed: $out"
    done
}

start() {
    local i pids=() failed=0
    for i in "${!NAMES[@]}"; do
        "$NODE" start "${NAMES[$i]}" "${PORTS[$i]}" "$((PORTS[i] + 20000))" &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed=1; done
    ((failed == 0)) || die "a node did not start"
    for name in "${NAMES[@]:1}"; do join "$name"; done
    local members
    members=$(running_nodes pigeon1 | wc -l)
    ((members == ${#NAMES[@]})) || die "only $members of ${#NAMES[@]} nodes are in the cluster"
    say "3 nodes up: PIGEON_URL=$(url)"
}

stop() {
    local name pids=()
    for name in "${NAMES[@]}"; do
        "$NODE" wipe "$name" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

status() {
    local name
    for name in "${NAMES[@]}"; do "$NODE" status "$name"; done
    if "$NODE" pid pigeon1 >/dev/null; then
        echo "running members: $(running_nodes pigeon1 | sort | tr '\n' ' ')"
    fi
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
url) url ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
