#!/usr/bin/env bash
# Make sure node and npm are on PATH, installing Debian's nodejs and npm if not,
# then install the interop tests' Node packages (tests/interop, amqplib) from
# their lockfile when node_modules is missing or older than package-lock.json.
# Silent when everything is there, one line per step it takes.
set -euo pipefail
cd "$(dirname "$0")/.."

# Wait for a dpkg lock held by another apt (unattended-upgrades on a fresh VM).
readonly APT_OPTS=(-o DPkg::Lock::Timeout=600)
readonly INTEROP=tests/interop

die() {
    printf 'ensure-node: error: %s\n' "$*" >&2
    exit 1
}

install_node() {
    local missing=()
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
    ((${#missing[@]})) || return 0

    [[ $EUID -eq 0 ]] ||
        die "${missing[*]} missing and installing needs root; run: sudo apt-get install -y nodejs npm"

    echo "ensure-node: installing ${missing[*]} (apt-get update && apt-get install)"
    local log
    log=$(mktemp)
    if ! { apt-get "${APT_OPTS[@]}" update &&
        DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        # NodeSource's nodejs bundles npm and conflicts with Debian's npm package.
        die "apt-get install ${missing[*]} failed (output above); if node came from" \
            "NodeSource, reinstall its nodejs package, which ships npm"
    fi
    rm -f "$log"
    for tool in node npm; do
        command -v "$tool" >/dev/null 2>&1 || die "apt-get finished, yet $tool is still not on PATH"
    done
}

install_interop_packages() {
    [[ -f $INTEROP/package-lock.json ]] || die "$INTEROP/package-lock.json is missing"
    if [[ -d $INTEROP/node_modules && ! $INTEROP/package-lock.json -nt $INTEROP/node_modules ]]; then
        return 0
    fi
    echo "ensure-node: installing $INTEROP packages (npm ci)"
    local log
    log=$(mktemp)
    if ! npm ci --prefix "$INTEROP" --no-audit --no-fund >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "npm ci --prefix $INTEROP failed (output above); is the npm registry reachable?"
    fi
    rm -f "$log"
    touch "$INTEROP/node_modules"
}

install_node
install_interop_packages
