#!/usr/bin/env bash
# Make sure node and npm are on PATH, installing Debian's nodejs and npm if not.
# Silent when both are there, one line when it installs them.
set -euo pipefail

# Wait for a dpkg lock held by another apt (unattended-upgrades on a fresh VM).
readonly APT_OPTS=(-o DPkg::Lock::Timeout=600)

die() {
    printf 'ensure-node: error: %s\n' "$*" >&2
    exit 1
}

missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
((${#missing[@]})) || exit 0

[[ $EUID -eq 0 ]] ||
    die "${missing[*]} missing and installing needs root; run: sudo apt-get install -y nodejs npm"

echo "ensure-node: installing ${missing[*]} (apt-get update && apt-get install)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get "${APT_OPTS[@]}" update &&
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    # NodeSource's nodejs bundles npm and conflicts with Debian's npm package.
    die "apt-get install ${missing[*]} failed (output above); if node came from" \
        "NodeSource, reinstall its nodejs package, which ships npm"
fi
for tool in node npm; do
    command -v "$tool" >/dev/null 2>&1 || die "apt-get finished, yet $tool is still not on PATH"
done
