"""Helpers for tests that run ``pigeon`` as a separate OS process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pigeon import Pigeon
from pigeon.settings import Settings
from tests.conftest import AppFactory, Broker, settings_env

ROOT = Path(__file__).resolve().parent.parent
PIGEON = [sys.executable, "-m", "pigeon"]


def env_for(settings: Settings, service: str, **extra: str) -> dict[str, str]:
    env = settings_env(settings)
    env["PIGEON_SERVICE"] = service
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_pigeon(
    env: dict[str, str], *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``pigeon ARGS`` run to its end from the repository root; its output as text."""
    return subprocess.run(
        [*PIGEON, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_listener(
    env: dict[str, str], *args: str, log: Path, app: str = "tests.apps.recorder:app"
) -> subprocess.Popen[bytes]:
    """``pigeon listen APP ARGS`` with its output in ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*PIGEON, "listen", app, *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for_log(log: Path, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {log} within {timeout}s:\n{log.read_text()[-3000:]}")


def recorded(path: Path, kind: str = "done") -> list[str]:
    if not path.exists():
        return []
    return [
        line.split(" ", 1)[1] for line in path.read_text().splitlines() if line.startswith(kind)
    ]


def wait_recorded(path: Path, count: int, kind: str = "done", timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = recorded(path, kind)
        if len(got) >= count:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{len(recorded(path, kind))}/{count} {kind!r} records within {timeout}s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Recorder:
    """A ``tests.apps.recorder`` listener's app, environment and files."""

    app: Pigeon
    env: dict[str, str]
    rec: Path
    log: Path


def recorder(make_app: AppFactory, broker: Broker, tmp_path: Path, **extra: str) -> Recorder:
    """The recorder app on this test's exchanges, recording into ``tmp_path``; its queue
    is deleted after the test."""
    app = make_app("recorder")
    rec = tmp_path / "rec.txt"
    env = env_for(app.settings, app.service or "", RECORDER_FILE=str(rec), **extra)
    broker.queues.add(f"{app.service}.record")
    return Recorder(app, env, rec, tmp_path / "listen.log")


async def drain_and_stop(
    broker: Broker, queue: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60.0
) -> list[int]:
    """Wait until ``queue`` holds no ready message, then stop ``procs`` gracefully.

    The join of a test on ``pigeon listen`` processes: what the broker had
    for them was delivered, and a graceful stop finishes (and acks) what is
    in flight, so nothing more can happen after it. Returns the exit codes.
    """
    deadline = time.monotonic() + timeout
    while await broker.count(queue):
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue} still holds messages after {timeout}s")
        await asyncio.sleep(0.05)
    return [stop(proc) for proc in procs]
