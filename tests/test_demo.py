"""`make demo`, `make demo-status` and `make demo-stop`, as a newcomer runs them.

This is the README's first command, so it runs for real: the repository's own
supervisord.conf and var/, the real names (pigeon.events,
notification.send-confirmation, ...) on the test broker, and LetterThief on
8025, or on DEMO_PORT when something else holds 8025. `make demo-stop` runs
whatever happens, so no demo outlives the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import AMQP_URL

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "supervisord.conf")
PROGRAMS = {
    "letterthief",
    "notification",
    "seller",
    "logistics:logistics-0",
    "logistics:logistics-1",
}


def port_taken(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def supervisords() -> list[int]:
    """Every running supervisord of this checkout's supervisord.conf."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.endswith("supervisord") for a in argv[:2]) and CONF in argv:
            found.append(int(cmdline.parent.name))
    return found


def make(
    target: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(900)  # make demo runs `make install`, which may have to reinstall
def test_make_demo_tells_the_story_and_make_demo_stop_ends_it() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIGEON_", "LETTERTHIEF_", "DEMO_", "MAKE"))
    }
    env["PIGEON_URL"] = AMQP_URL
    make("demo-stop", env)  # a demo already running here would hold the port
    env["DEMO_PORT"] = str(port := free_port() if port_taken(8025) else 8025)
    try:
        first = make("demo", env, timeout=800)
        out = first.stdout + first.stderr
        assert first.returncode == 0, out
        assert "20/20 confirmation emails, 17/17 tracking emails, 3/3 orders waiting" in out
        assert f"http://127.0.0.1:{port}   login: demo / pigeon-demo" in out

        status = make("demo-status", env)
        assert status.returncode == 0, status.stdout + status.stderr
        states = {
            line.split()[0]: line.split()[1]
            for line in status.stdout.splitlines()
            if line.split() and line.split()[0] in PROGRAMS
        }
        assert states == dict.fromkeys(PROGRAMS, "RUNNING")
        assert "healthy" in status.stdout
        open_letters = httpx.get(
            f"http://127.0.0.1:{port}/api/dead-letters",
            params={"status": "open", "event": "order.placed"},
            auth=("demo", "pigeon-demo"),
            timeout=10,
        )
        assert open_letters.status_code == 200
        assert open_letters.json()["total"] >= 3

        # Running it again restarts the story; it never starts a second supervisord.
        second = make("demo", env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "already running: restarting it" in second.stdout
        assert len(supervisords()) == 1
    finally:
        stopped = make("demo-stop", env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert supervisords() == []
    assert not port_taken(port)
    assert "not running" in make("demo-status", env).stdout
