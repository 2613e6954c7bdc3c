#!/usr/bin/env bash
# Make sure the servers the test suite talks to answer on 127.0.0.1:
#   RabbitMQ   5672
#   Redis      6379
#   PostgreSQL 5432, with a database "test" that user "postgres" reaches
#              without a password (trust auth for 127.0.0.1 and ::1)
#
# A server whose port answers is left alone. One that is installed but stopped
# is started; one that is missing is installed from Debian's packages first.
# The script is idempotent and prints nothing when all is well, one line per
# action it takes otherwise, and the failing command's output if one fails.
#
# Usage: scripts/ensure-services.sh [--only] [rabbitmq] [redis] [postgres]
#        (names may also be comma-separated; default: all three)
set -euo pipefail

# rabbitmq-server, rabbitmqctl and friends live in /usr/sbin.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

readonly RABBITMQ_PORT=5672 REDIS_PORT=6379 POSTGRES_PORT=5432
readonly RABBITMQ_TIMEOUT=120 REDIS_TIMEOUT=30 POSTGRES_TIMEOUT=60
readonly PG_DATABASE=test
# Wait for a dpkg lock held by another apt (unattended-upgrades on a fresh VM).
readonly APT_OPTS=(-o DPkg::Lock::Timeout=600)
readonly MARKER="# Added by Pigeon's scripts/ensure-services.sh"

say() { printf 'ensure-services: %s\n' "$*"; }
die() {
    printf 'ensure-services: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<'EOF'
Usage: scripts/ensure-services.sh [--only] [rabbitmq] [redis] [postgres]

Start (installing with apt-get if needed) RabbitMQ, Redis and PostgreSQL on
127.0.0.1 for the test suite. Without names, all three.
EOF
}

have() { command -v "$1" >/dev/null 2>&1; }

port_answers() { timeout 2 bash -c ": </dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# wait_until SECONDS CMD...: succeed as soon as CMD does, fail once SECONDS pass.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

# run_logged WHAT CMD...: run CMD out of sight; show its output only if it fails.
# Output goes to a file, not a pipe, so a daemon that keeps the descriptor
# open cannot hang us.
run_logged() {
    local what=$1 log
    shift
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "$what failed (output above)"
    fi
    rm -f "$log"
}

require_root() {
    [[ $EUID -eq 0 ]] || die "$1 needs root; run: sudo $0"
}

apt_updated=0
apt_install() {
    require_root "installing $*"
    say "installing $* (apt-get update && apt-get install)"
    if ((!apt_updated)); then
        run_logged "apt-get update" apt-get "${APT_OPTS[@]}" update
        apt_updated=1
    fi
    # LANG: a bare image has none, and PostgreSQL would create its cluster as
    # SQL_ASCII; C.UTF-8 always exists on Debian.
    run_logged "apt-get install $*" \
        env DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 apt-get "${APT_OPTS[@]}" install -y "$@"
}

# --- RabbitMQ ---------------------------------------------------------------

rabbitmq_ready() {
    timeout 15 rabbitmqctl -q await_startup --timeout 10 && port_answers "$RABBITMQ_PORT"
}

# A fresh install names its node rabbit@<hostname>, which fails to boot when the
# hostname does not resolve and loses its data directory when the hostname
# changes (containers). Pin the name before the package's first start, as the
# project's reference machine does; an existing env file is left alone.
rabbitmq_pin_nodename() {
    local env_file=/etc/rabbitmq/rabbitmq-env.conf
    [[ -e $env_file ]] && return 0
    require_root "writing $env_file"
    mkdir -p /etc/rabbitmq
    printf '%s\n' "$MARKER" 'NODENAME=rabbit@localhost' >"$env_file"
    say "pinned the RabbitMQ node name to rabbit@localhost in $env_file"
}

ensure_rabbitmq() {
    port_answers "$RABBITMQ_PORT" && return 0
    if ! have rabbitmq-server; then
        rabbitmq_pin_nodename
        apt_install rabbitmq-server
    fi
    # The package may have started the node itself, or it may still be booting.
    if ! port_answers "$RABBITMQ_PORT" && ! timeout 30 rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
        require_root "starting RabbitMQ"
        say "starting RabbitMQ (rabbitmq-server -detached)"
        run_logged "rabbitmq-server -detached" rabbitmq-server -detached
    fi
    wait_until "$RABBITMQ_TIMEOUT" rabbitmq_ready ||
        die "RabbitMQ did not come up on 127.0.0.1:$RABBITMQ_PORT within ${RABBITMQ_TIMEOUT}s;" \
            "see its logs in /var/log/rabbitmq/ (rabbit@*.log, startup_log, startup_err)"
}

# --- Redis ------------------------------------------------------------------

redis_ready() {
    [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

ensure_redis() {
    port_answers "$REDIS_PORT" && return 0
    if ! have redis-server; then
        apt_install redis-server
    fi
    if ! port_answers "$REDIS_PORT"; then
        say "starting Redis (redis-server --daemonize yes, 127.0.0.1:$REDIS_PORT, no persistence)"
        run_logged "redis-server" redis-server --daemonize yes --bind 127.0.0.1 -::1 \
            --port "$REDIS_PORT" --save "" --appendonly no
    fi
    wait_until "$REDIS_TIMEOUT" redis_ready ||
        die "Redis did not answer PING on 127.0.0.1:$REDIS_PORT within ${REDIS_TIMEOUT}s;" \
            "run redis-server --port $REDIS_PORT in a terminal to see why"
}

# --- PostgreSQL -------------------------------------------------------------

# The newest Debian cluster version under /etc/postgresql, or nothing.
pg_version() {
    [[ -d /etc/postgresql ]] || return 0
    find /etc/postgresql -mindepth 2 -maxdepth 2 -name main -type d -printf '%P\n' |
        cut -d/ -f1 | sort -V | tail -n 1
}

# psql as postgres over TCP, refusing to prompt and ignoring any saved password:
# the test suite connects without one.
psql_as_postgres() {
    env -u PGPASSWORD PGPASSFILE=/nonexistent/.pgpass \
        psql -X -w -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$POSTGRES_PORT" -U postgres "$@"
}

postgres_trusts_us() { psql_as_postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; }

# Debian's default pg_hba.conf asks for a password (scram-sha-256) on 127.0.0.1.
# Prepend trust lines for loopback (the first matching line wins) and reload.
postgres_ensure_trust() {
    postgres_trusts_us && return 0
    local version hba
    version=$(pg_version)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    if [[ -z $version || ! -f $hba ]] || grep -qF "$MARKER" "$hba"; then
        die "user postgres cannot connect to 127.0.0.1:$POSTGRES_PORT without a password;" \
            "put 'host all all 127.0.0.1/32 trust' first in pg_hba.conf and reload PostgreSQL" \
            "(psql -h 127.0.0.1 -U postgres -w says why)"
    fi
    require_root "editing $hba"
    say "allowing passwordless (trust) connections from 127.0.0.1 and ::1 in $hba"
    local updated
    updated=$(mktemp)
    {
        printf '%s\n' "$MARKER: the test suite connects as" \
            "# postgres without a password, from this machine only." \
            'host    all             all             127.0.0.1/32            trust' \
            'host    all             all             ::1/128                 trust' ''
        cat "$hba"
    } >"$updated"
    cat "$updated" >"$hba" # keeps the file's owner and mode
    rm -f "$updated"
    run_logged "pg_ctlcluster reload" \
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    wait_until 10 postgres_trusts_us ||
        die "user postgres still cannot connect to 127.0.0.1:$POSTGRES_PORT without a password" \
            "after editing $hba; check it by hand"
}

postgres_ensure_database() {
    local exists
    exists=$(psql_as_postgres -d postgres -tAc \
        "select 1 from pg_database where datname = '$PG_DATABASE'")
    [[ $exists == 1 ]] && return 0
    say "creating PostgreSQL database $PG_DATABASE"
    run_logged "create database $PG_DATABASE" \
        psql_as_postgres -d postgres -c "create database $PG_DATABASE template template0
            encoding 'UTF8' lc_collate 'C.UTF-8' lc_ctype 'C.UTF-8'"
}

ensure_postgres() {
    if ! port_answers "$POSTGRES_PORT"; then
        if ! have pg_ctlcluster; then
            apt_install postgresql
        fi
        local version
        version=$(pg_version)
        [[ -n $version ]] ||
            die "PostgreSQL is installed but has no cluster under /etc/postgresql;" \
                "create one with: pg_createcluster <version> main"
        if ! port_answers "$POSTGRES_PORT" &&
            ! pg_ctlcluster "$version" main status >/dev/null 2>&1; then
            require_root "starting PostgreSQL"
            say "starting PostgreSQL $version/main (pg_ctlcluster)"
            run_logged "pg_ctlcluster start" \
                pg_ctlcluster --skip-systemctl-redirect "$version" main start
        fi
        wait_until "$POSTGRES_TIMEOUT" pg_isready -q -h 127.0.0.1 -p "$POSTGRES_PORT" ||
            die "PostgreSQL did not accept connections on 127.0.0.1:$POSTGRES_PORT within" \
                "${POSTGRES_TIMEOUT}s; see /var/log/postgresql/postgresql-$version-main.log"
    fi
    if ! have psql; then
        die "psql is missing; install it with: apt-get install -y postgresql-client"
    fi
    postgres_ensure_trust
    postgres_ensure_database
}

# --- main -------------------------------------------------------------------

main() {
    local want_rabbitmq=0 want_redis=0 want_postgres=0 arg name
    local -a names=() parts
    while (($#)); do
        case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --only) ;;
        --only=*) names+=("${1#--only=}") ;;
        -*)
            printf 'ensure-services: unknown option %q\n' "$1" >&2
            usage >&2
            exit 2
            ;;
        *) names+=("$1") ;;
        esac
        shift
    done
    ((${#names[@]})) || names=(rabbitmq redis postgres)
    for arg in "${names[@]}"; do
        IFS=, read -ra parts <<<"$arg"
        for name in "${parts[@]}"; do
            case $name in
            rabbitmq) want_rabbitmq=1 ;;
            redis) want_redis=1 ;;
            postgres | postgresql) want_postgres=1 ;;
            *)
                printf 'ensure-services: unknown service %q; choose from rabbitmq, redis, postgres\n' \
                    "$name" >&2
                exit 2
                ;;
            esac
        done
    done
    if ((want_rabbitmq)); then ensure_rabbitmq; fi
    if ((want_redis)); then ensure_redis; fi
    if ((want_postgres)); then ensure_postgres; fi
}

main "$@"
