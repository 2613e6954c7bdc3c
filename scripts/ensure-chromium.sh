#!/usr/bin/env bash
# Make sure Debian's Chromium is at /usr/bin/chromium. The browser tests drive
# it through Playwright; we never use a browser Playwright downloads, so
# `playwright install` is not part of the set-up. Silent when Chromium is
# already there, one line when it installs it.
set -euo pipefail

readonly CHROMIUM=/usr/bin/chromium

# Wait for a dpkg lock held by another apt (unattended-upgrades on a fresh VM).
readonly APT_OPTS=(-o DPkg::Lock::Timeout=600)

die() {
    printf 'ensure-chromium: error: %s\n' "$*" >&2
    exit 1
}

[[ -x $CHROMIUM ]] && exit 0

[[ $EUID -eq 0 ]] ||
    die "$CHROMIUM is missing and installing it needs root; run: sudo apt-get install -y chromium"

echo "ensure-chromium: installing chromium (apt-get update && apt-get install)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get "${APT_OPTS[@]}" update &&
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y chromium; } >"$log" 2>&1; then
    cat "$log" >&2
    die "apt-get install chromium failed (output above)"
fi
[[ -x $CHROMIUM ]] || die "apt-get installed chromium, yet $CHROMIUM is still missing"
