"""docker-compose.yml and supervisord.conf describe the same deployment.

Docker does not run here, so the compose file is read back and compared with
supervisord.conf as supervisor itself parses it (``ServerOptions``): the same
programs with the same flags and settings, and what containers need on top
(a broker healthcheck to wait for, volumes for what must survive).
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from supervisor.options import ServerOptions

ROOT = Path(__file__).resolve().parents[1]

# Settings compose sets and supervisor leaves to the environment it inherits.
COMPOSE_ONLY = {"PIGEON_URL"}
# Settings that name a file or directory: in compose they must live on a volume.
PATHS = {
    "NOTIFICATION_MAIL_DIR",
    "SELLER_DATABASE",
    "LOGISTICS_PARTNERS_FILE",
    "LETTERTHIEF_DATABASE_URL",
}
LISTENERS = ("notification", "seller", "logistics")
METRICS = ["--metrics-port", "9100"]


@dataclass
class Program:
    """One supervisor program: its processes' command, environment and stop settings."""

    argv: list[str]
    environment: dict[str, str]
    numprocs: int
    config: Any


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Program]:
    """supervisord.conf as supervisord reads it (from a copy, so var/log may be created)."""
    home = tmp_path_factory.mktemp("conf")
    shutil.copy(ROOT / "supervisord.conf", home / "supervisord.conf")
    (home / "var" / "log").mkdir(parents=True)
    options = ServerOptions()
    options.realize(args=["-c", str(home / "supervisord.conf")])
    programs = {}
    for group in options.process_group_configs:
        first = group.process_configs[0]
        programs[group.name] = Program(
            argv=shlex.split(first.command),
            environment=dict(first.environment or {}),
            numprocs=len(group.process_configs),
            config=first,
        )
    return programs


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def program_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services that run a supervisor program (not the broker, not tools)."""
    return {
        name: service
        for name, service in services(compose).items()
        if "build" in service and not service.get("profiles")
    }


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment: as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> list[str]:
    """Container paths of the service's named volumes."""
    return [volume.split(":")[1] for volume in service.get("volumes", [])]


def test_compose_runs_exactly_the_programs_of_supervisord_conf(
    supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    assert (
        set(program_services(compose))
        == set(supervisor)
        == {*LISTENERS, "letterthief", "orders-relay"}
    )


def test_the_orders_relay_publishes_the_orders_database_in_both(
    supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    argv = supervisor["orders-relay"].argv
    service = services(compose)["orders-relay"]
    command = service["command"]
    var = str(Path(supervisor["orders-relay"].config.directory) / "var")

    assert Path(argv[0]).name == command[0] == "pigeon"
    assert argv[1:3] == command[1:3] == ["outbox", "relay"]
    assert argv[3] == f"sqlite:///{var}/orders.db"
    assert argv[4:] == command[4:-2] == ["--create-tables"]
    assert command[-2:] == METRICS
    # the relay reads the database the orders tool writes: one volume for both
    orders = services(compose)["orders"]
    database = environment(orders)["ORDERS_DATABASE"]
    assert command[3] == f"sqlite:///{database}"
    assert mounts(orders) == mounts(service) == [str(Path(database).parent)]


def test_logistics_runs_two_competing_consumers_in_both(
    supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    assert supervisor["logistics"].numprocs == 2
    assert services(compose)["logistics"]["deploy"]["replicas"] == 2
    for name in ("notification", "seller", "letterthief"):
        assert supervisor[name].numprocs == 1
        assert services(compose)[name].get("deploy", {}).get("replicas", 1) == 1


@pytest.mark.parametrize("name", LISTENERS)
def test_a_listener_runs_the_same_command_with_the_same_flags(
    name: str, supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    argv = supervisor[name].argv
    command = services(compose)[name]["command"]

    assert Path(argv[0]).name == command[0] == "pigeon"
    assert argv[1:3] == ["listen", f"listeners.{name}:app"]
    # Containers add a health endpoint; under supervisor each process would need its own port.
    assert command[-2:] == METRICS
    assert command[1:-2] == argv[1:]
    for flag in ("--max-messages", "--max-memory", "--shutdown-timeout"):
        assert flag in argv, f"{name}: pigeon listen without {flag}"


def test_letterthief_serves_on_8025_with_a_login_in_both(
    supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    argv = supervisor["letterthief"].argv
    service = services(compose)["letterthief"]
    command = service["command"]

    assert Path(argv[0]).name == command[0] == "letterthief"
    assert argv[1:] == ["serve", "--host", "127.0.0.1", "--port", "8025"]
    # Inside a container loopback is unreachable from the host; LetterThief
    # only serves 0.0.0.0 with a login, and compose publishes it on loopback.
    assert command[1:] == ["serve", "--host", "0.0.0.0", "--port", "8025"]
    assert service["ports"] == ["127.0.0.1:8025:8025"]
    for env in (supervisor["letterthief"].environment, environment(service)):
        assert env["LETTERTHIEF_USERNAME"]
        assert env["LETTERTHIEF_PASSWORD"]


@pytest.mark.parametrize("name", [*LISTENERS, "letterthief"])
def test_a_program_gets_the_same_settings_in_both(
    name: str, supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    ours = supervisor[name].environment
    theirs = environment(services(compose)[name])

    assert set(theirs) - COMPOSE_ONLY == set(ours)
    for key, value in ours.items():
        if key in PATHS or key == "PIGEON_IDEMPOTENCY_URL":
            continue
        assert theirs[key] == value, key
    if name in LISTENERS:
        assert ours["PIGEON_SERVICE"] == name


@pytest.mark.parametrize("name", [*LISTENERS, "letterthief"])
def test_what_a_program_writes_lives_under_var_or_on_a_volume(
    name: str, supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    ours = supervisor[name].environment
    var = str(Path(supervisor[name].config.directory) / "var")
    service = services(compose)[name]
    named = set(compose["volumes"])
    for key in PATHS & set(ours):
        local = ours[key].removeprefix("sqlite:///")
        container = environment(service)[key].removeprefix("sqlite:///")
        assert local.startswith(var + "/"), f"{key}={ours[key]} is not under var/"
        assert any(container == m or container.startswith(m + "/") for m in mounts(service)), (
            f"{name}: {key}={container} is on no volume; it would vanish with the container"
        )
    for volume in service.get("volumes", []):
        assert volume.split(":")[0] in named, f"{volume} is not a named volume"


def test_the_idempotency_store_is_shared_by_every_process_of_a_listener(
    supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    # Under supervisor all processes share one host, so one SQLite file; the
    # compose replicas are separate hosts and need a networked store.
    for name in LISTENERS:
        local = supervisor[name].environment["PIGEON_IDEMPOTENCY_URL"]
        remote = environment(services(compose)[name])["PIGEON_IDEMPOTENCY_URL"]
        assert local.startswith("sqlite:////"), local
        assert urlsplit(remote).scheme in ("redis", "postgresql"), remote
        assert urlsplit(remote).hostname in services(compose)


def test_every_program_reaches_the_broker_of_the_compose_file(compose: dict[str, Any]) -> None:
    for name, service in program_services(compose).items():
        url = urlsplit(environment(service)["PIGEON_URL"])
        assert url.scheme == "amqp"
        assert url.hostname == "rabbitmq", name


def test_the_broker_is_rabbitmq_with_a_healthcheck(compose: dict[str, Any]) -> None:
    rabbitmq = services(compose)["rabbitmq"]

    assert rabbitmq["image"] == "rabbitmq:3.13-management"
    assert rabbitmq["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert any(v.endswith(":/var/lib/rabbitmq") for v in rabbitmq["volumes"])


def test_programs_start_once_their_dependencies_are_healthy(compose: dict[str, Any]) -> None:
    all_services = services(compose)
    for name, service in all_services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} → {dependency}"
            assert "healthcheck" in all_services[dependency], dependency
    for name in program_services(compose):
        assert "rabbitmq" in all_services[name]["depends_on"], name
        assert "healthcheck" in all_services[name], name


def test_stopping_waits_longer_than_pigeons_drain_in_both(
    supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    for name in LISTENERS:
        argv = supervisor[name].argv
        drain = float(argv[argv.index("--shutdown-timeout") + 1])
        config = supervisor[name].config
        service = services(compose)[name]

        assert config.stopwaitsecs > drain
        assert float(service["stop_grace_period"].removesuffix("s")) > drain
        assert service["stop_signal"] == "SIGTERM"


def test_supervisor_restarts_recycled_workers_and_gives_up_on_crash_loops(
    supervisor: dict[str, Program], compose: dict[str, Any]
) -> None:
    for name, program in supervisor.items():
        config = program.config
        # exit 0 after --max-messages must restart too: "unexpected" would not.
        assert config.autorestart.__name__ == "RestartUnconditionally", name
        assert 1 <= config.startretries <= 10, name
        assert config.startsecs >= 3, name
        assert config.redirect_stderr, name
        assert config.stdout_logfile_maxbytes > 0, name
        assert config.stdout_logfile_backups > 0, name
        assert services(compose)[name]["restart"] == "unless-stopped", name


def test_supervisord_conf_keeps_everything_under_its_own_directory() -> None:
    text = (ROOT / "supervisord.conf").read_text()
    for line in text.splitlines():
        if line.startswith(";") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        for word in value.replace('"', " ").replace(",", " ").split():
            path = word.split("=")[-1].removeprefix("unix://").removeprefix("sqlite:///")
            assert not path.startswith("/"), f"{key.strip()}: absolute path {path}"


def test_the_image_is_python_311_slim_with_the_extras_compose_needs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()

    assert "FROM python:3.11-slim" in dockerfile
    assert "pip install '.[letterthief,redis,postgres]'" in dockerfile
    assert "COPY listeners" in dockerfile
    assert "USER " in dockerfile
    for heavy in (".venv", "var", ".git"):
        assert heavy in ignored
