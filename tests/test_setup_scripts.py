"""The set-up plumbing a user runs before anything else: scripts/, the Makefile, .ci/run.

These tests check what a user would check by hand: the scripts parse, the
services script leaves RabbitMQ, Redis and PostgreSQL answering (and says
nothing when they already do), `make test` lints before it tests, and CI calls
the same command.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
ENSURE_SERVICES = SCRIPTS / "ensure-services.sh"
CI_RUN = ROOT / ".ci" / "run"

SERVICE_PORTS = {"rabbitmq": 5672, "redis": 6379, "postgres": 5432}

# Long enough for a first run that installs a service with apt-get.
INSTALL_TIMEOUT_S = 900


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root, capturing its output as text."""
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_the_set_up_scripts_exist_and_are_executable() -> None:
    for name in ("ensure-services.sh", "ensure-chromium.sh", "ensure-node.sh"):
        script = SCRIPTS / name
        assert script.is_file(), f"{script} is missing"
        assert os.access(script, os.X_OK), f"{script} is not executable; chmod +x it"


@pytest.mark.parametrize(
    "script",
    [*sorted(SCRIPTS.glob("*.sh")), CI_RUN],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_every_script_passes_bash_syntax_check(script: Path) -> None:
    result = run("bash", "-n", script)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
@pytest.mark.parametrize(("service", "port"), SERVICE_PORTS.items())
def test_ensure_services_leaves_the_named_service_answering(service: str, port: int) -> None:
    result = run(ENSURE_SERVICES, "--only", service, timeout=INSTALL_TIMEOUT_S)

    assert result.returncode == 0, result.stdout + result.stderr
    assert port_answers(port), f"{service} does not answer on 127.0.0.1:{port}"


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_ensure_services_is_a_silent_no_op_once_everything_runs() -> None:
    first = run(ENSURE_SERVICES, timeout=INSTALL_TIMEOUT_S)
    assert first.returncode == 0, first.stdout + first.stderr

    again = run(ENSURE_SERVICES)

    assert again.returncode == 0, again.stdout + again.stderr
    assert (again.stdout, again.stderr) == ("", "")
    for service, port in SERVICE_PORTS.items():
        assert port_answers(port), f"{service} does not answer on 127.0.0.1:{port}"


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_postgres_has_a_test_database_open_to_postgres_without_a_password() -> None:
    assert run(ENSURE_SERVICES, "postgres", timeout=INSTALL_TIMEOUT_S).returncode == 0
    psql = shutil.which("psql")
    assert psql is not None, "psql is missing; apt-get install -y postgresql-client"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}

    result = subprocess.run(
        [psql, "-X", "-w", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-tAc", "select 1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )

    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr


def test_ensure_services_rejects_an_unknown_service_with_the_valid_names() -> None:
    result = run(ENSURE_SERVICES, "mysql")

    assert result.returncode == 2
    assert "choose from rabbitmq, redis, postgres" in result.stderr


def test_make_test_sets_up_then_lints_then_runs_pytest() -> None:
    # A make that runs us (make test) must not hand its flags to this one.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    result = subprocess.run(
        ["make", "-n", "test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()

    def position(fragment: str) -> int:
        matches = [i for i, line in enumerate(commands) if fragment in line]
        assert matches, f"`make -n test` never runs {fragment!r}:\n{result.stdout}"
        return matches[0]

    set_up = [
        position(f"scripts/{name}")
        for name in ("ensure-services.sh", "ensure-chromium.sh", "ensure-node.sh")
    ]
    lint = [position("ruff check ."), position("ruff format --check ."), position("bin/mypy")]
    tests = position("bin/pytest")
    assert max(set_up) < min(lint)
    assert max(lint) < tests


def test_ci_runs_the_readme_test_command() -> None:
    assert os.access(CI_RUN, os.X_OK), f"{CI_RUN} is not executable; chmod +x it"
    lines = [line.strip() for line in CI_RUN.read_text().splitlines()]

    assert lines[0] in {"#!/usr/bin/env bash", "#!/bin/bash"}
    assert "set -euo pipefail" in lines
    assert "make test" in lines


def test_rabbit_node_counts_a_killed_node_awaiting_its_reaper_as_stopped(tmp_path: Path) -> None:
    """A node killed with -9 is a zombie until PID 1 reaps it (seconds, here); a node
    brought back meanwhile must really be started, not waited for (CI timed out on it)."""
    zombie = subprocess.Popen(["sleep", "300"])
    zombie.kill()
    try:
        stat = ""
        for _ in range(100):  # until the kernel has turned it into a zombie
            stat = Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0]
            if stat == "Z":
                break
            subprocess.run(["sleep", "0.01"], check=True)
        assert stat == "Z", "the child never became a zombie"
        (tmp_path / "ghost").mkdir()
        (tmp_path / "ghost" / "rabbit.pid").write_text(f"{zombie.pid}\n")
        found = subprocess.run(
            [SCRIPTS / "rabbit-node.sh", "pid", "ghost"],
            env={**os.environ, "PIGEON_RABBIT_BASE": str(tmp_path)},
            capture_output=True,
            text=True,
            check=False,
        )
        assert found.returncode == 1, f"a zombie counted as running: {found.stdout!r}"
    finally:
        zombie.wait()
