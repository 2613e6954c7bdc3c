"""`make demo`, `make demo-status` and `make demo-stop`, as a newcomer runs them.

This is the README's first command, so it runs for real: the repository's
Makefile, scripts, supervisord.conf and listeners, the real names
(pigeon.events, notification.send-confirmation, ...) on the test broker, and
LetterThief on 8025, or on DEMO_PORT when something else holds 8025.

The test owns what it stops: it runs its demo from a copy of those files in
a temporary directory (its own var/, socket and supervisord), and stops only
that one; a demo already running anywhere on this machine is never touched
(the test is skipped instead). It owns what it declares: the demo's fixed
names live in a virtual host of this test's own (tests.leaks.private_vhost),
deleted with all it holds at the end, so a developer's queues are never
shared, filled or left behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import leaks
from tests.conftest import AMQP_URL

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
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


def supervisords(conf: str | None = None) -> dict[int, str]:
    """Running supervisords (pid: config file) of ``conf``, or of any demo's config."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("supervisord") for a in argv[:2]):
            continue
        confs = [a for a in argv if a.endswith(".conf")]
        if conf is not None:
            if conf in argv:
                found[int(cmdline.parent.name)] = conf
        elif confs and _is_a_demo(Path(cmdline.parent, "cwd"), confs[0]):
            found[int(cmdline.parent.name)] = confs[0]
    return found


def _is_a_demo(cwd: Path, conf: str) -> bool:
    try:
        return "pigeon listen listeners." in (cwd / conf).read_text()
    except OSError:
        return True  # unreadable: someone else's, perhaps a demo; leave it alone


def demo_copy(into: Path) -> Path:
    """What `make demo` needs, copied into ``into``; the virtualenv is this checkout's."""
    for name in ("Makefile", "pyproject.toml", "supervisord.conf"):
        shutil.copy2(ROOT / name, into / name)  # mtimes kept: make sees .venv up to date
    ignore = shutil.ignore_patterns("__pycache__", "var")
    for name in ("scripts", "listeners"):
        shutil.copytree(ROOT / name, into / name, ignore=ignore)
    (into / ".venv").symlink_to(ROOT / ".venv")
    return into


def make(
    target: str, env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def demo_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The test broker's URL on a virtual host of this test's own, deleted after it."""
    with leaks.private_vhost(AMQP_URL, request.node.nodeid) as url:
        yield url


@pytest.mark.timeout(900)  # make demo runs `make install`, which may have to reinstall
def test_make_demo_tells_the_story_and_make_demo_stop_ends_it(
    tmp_path: Path, demo_url: str
) -> None:
    running = supervisords()
    if running:
        pytest.skip(f"a demo is running ({running}); this test stops only the demo it starts")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIGEON_", "LETTERTHIEF_", "DEMO_", "MAKE"))
    }
    env["PIGEON_URL"] = demo_url
    env["DEMO_PORT"] = str(port := free_port() if port_taken(8025) else 8025)
    # the checkout's own virtualenv, up to date, so the copy's `make install` has nothing to do
    installed = make("install", env, ROOT, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    root = demo_copy(tmp_path)
    conf = str(root / "supervisord.conf")
    try:
        first = make("demo", env, root, timeout=800)
        out = first.stdout + first.stderr
        assert first.returncode == 0, out
        assert "20/20 confirmation emails, 17/17 tracking emails, 3/3 orders waiting" in out
        assert f"http://127.0.0.1:{port}   login: demo / pigeon-demo" in out

        status = make("demo-status", env, root)
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
        second = make("demo", env, root)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "already running: restarting it" in second.stdout
        assert len(supervisords(conf)) == 1
    finally:
        stopped = make("demo-stop", env, root)  # the copy's: only the demo started here
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert supervisords(conf) == {}
    assert not port_taken(port)
    assert "not running" in make("demo-status", env, root).stdout
