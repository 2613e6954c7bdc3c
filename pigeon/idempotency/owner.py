"""Who holds a claim, so a claim of a process that provably died is taken over at once.

A claim token is ``{random}@{place}:{pid}:{start}``: 128 random bits, then
the claimer's *place* (host name, kernel boot id and pid namespace: where
process ids can be compared), its pid and its start time (clock ticks since
boot, from ``/proc``). Another process in the same place can tell for
certain that the holder is gone: its pid no longer exists, or now belongs
to a process that started at another time (the pid was reused). A holder in
another place (another host, container or boot) cannot be checked; its
claim is waited for until its lease runs out.
"""

from __future__ import annotations

import os
import socket

_cache: tuple[int, str] | None = None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _place() -> str:
    try:
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        namespace = ""
    boot = _read("/proc/sys/kernel/random/boot_id")[:8]
    return f"{socket.gethostname()}/{boot}/{namespace}".replace(":", "_").replace("@", "_")


def start_time(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot; ``""`` if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def owner() -> str:
    """This process: ``{place}:{pid}:{start}`` (computed once per pid, so forks get their own)."""
    global _cache
    pid = os.getpid()
    if _cache is None or _cache[0] != pid:
        _cache = (pid, f"{_place()}:{pid}:{start_time(pid)}")
    return _cache[1]


def holder_is_dead(token: str | None) -> bool:
    """Whether the claim with ``token`` belongs to a process of this place that is gone.

    False whenever that cannot be proven: a token without an owner (an older
    Pigeon), another place, or a process that is still alive.
    """
    if not token or "@" not in token:
        return False
    parts = token.partition("@")[2].rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    place, pid_text, start = parts
    if place != owner().rsplit(":", 2)[0]:
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, but another user's: alive
        pass
    now = start_time(pid)
    return bool(start and now and now != start)
