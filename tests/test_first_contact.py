"""What a newcomer meets in the first hour: a quiet library, short errors, clean exits.

Each test here is a defect of issue 14 that once failed: a library printing to
its host's stdout, warnings at the end of ``asyncio.run()``, permanent broker
errors retried as outages, tracebacks for bad settings, handler signatures
accepted and then miscalled.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from pigeon import (
    BrokerRefused,
    ConfigurationError,
    Context,
    DispatchError,
    Event,
    Pigeon,
    Retry,
)
from pigeon.dispatch import Publisher
from pigeon.errors import SettingsError
from pigeon.events import lookup
from pigeon.settings import Settings
from pigeon.testing import deliver
from tests.conftest import (
    AMQP_URL,
    AppFactory,
    Broker,
    RunWorker,
    broker_url,
    eventually,
    settings_env,
)
from tests.procs import (
    PIGEON,
    ROOT,
    env_for,
    recorded,
    start_listener,
    stop,
    wait_for_log,
    wait_recorded,
)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def run_script(
    tmp_path: Path, code: str, env: dict[str, str], *flags: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, *flags, str(script)],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_strictly(
    tmp_path: Path, code: str, settings: Settings, *noise: str
) -> subprocess.CompletedProcess[str]:
    """``code`` run with warnings as errors in development mode; it succeeds and its
    stderr shows no sign of an unclean end (nor any of ``noise``)."""
    result = run_script(tmp_path, code, settings_env(settings), "-W", "error", "-X", "dev")
    assert result.returncode == 0, result.stderr
    for sign in ("connection_lost", "Task was destroyed", "Traceback", "Warning", *noise):
        assert sign not in result.stderr, result.stderr
    return result


# -- 1: the library prints nothing ----------------------------------------------------


def test_a_script_that_dispatches_prints_only_its_own_output(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    broker.track(settings)
    code = """
        import pigeon
        for n in range(3):
            print(pigeon.dispatch("first.contact", {"n": n}))
    """
    for fmt in ("json", "console"):
        env = {**settings_env(settings), "PIGEON_LOG_FORMAT": fmt}
        result = run_script(tmp_path, code, env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 3
        assert all(UUID.match(line) for line in lines), result.stdout
        assert result.stderr == ""


def test_a_script_that_configured_logging_gets_pigeons_logs_there(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    broker.track(settings)
    code = """
        import logging, pigeon
        logging.basicConfig(level=logging.INFO)
        print(pigeon.dispatch("first.contact", {"n": 1}))
    """
    result = run_script(tmp_path, code, settings_env(settings))
    assert result.returncode == 0, result.stderr
    assert UUID.match(result.stdout.strip())
    assert "broker.connected" in result.stderr
    assert "guest:guest" not in result.stderr


# -- 2: asyncio.run() ends cleanly ----------------------------------------------------


def test_asyncio_run_with_dispatch_async_ends_without_warnings(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    broker.track(settings)
    code = """
        import asyncio, logging, pigeon
        logging.basicConfig(level=logging.DEBUG)

        async def main():
            print(await pigeon.dispatch_async("first.contact", {"n": 1}))

        asyncio.run(main())
    """
    result = run_strictly(tmp_path, code, settings, "never")
    assert UUID.match(result.stdout.strip())


def test_close_and_async_with_release_the_connection(
    settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    broker.track(settings)
    code = """
        import asyncio, logging, pigeon
        from pigeon import Pigeon
        logging.basicConfig(level=logging.DEBUG)

        async def main():
            print(await pigeon.dispatch_async("first.contact", {"n": 1}))
            await pigeon.close()
            async with Pigeon(service="first-contact") as app:
                print(await app.dispatch_async("first.contact", {"n": 2}))
            print("closed", not app.runtime().connector.is_open)

        asyncio.run(main())
    """
    result = run_strictly(tmp_path, code, settings)
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[2] == "closed True"
    assert result.stderr.count("broker.connected") == 2


# -- 3: permanent broker errors are configuration errors -------------------------------

WRONG_PASSWORD = broker_url(password="not-the-password")
MISSING_VHOST = broker_url(vhost="pigeon-no-such-vhost-3f9a")
TLS_ON_PLAIN_PORT = broker_url(scheme="amqps")


async def _dispatch_error(settings: Settings, url: str) -> DispatchError:
    app = Pigeon(service="first-contact", settings=settings.model_copy(update={"url": url}))
    try:
        with pytest.raises(DispatchError) as caught:
            await app.dispatch_async("first.contact", {"n": 1})
    finally:
        await app.close()
    return caught.value


async def test_a_wrong_password_is_refused_at_once_naming_the_user(settings: Settings) -> None:
    error = await _dispatch_error(
        settings.model_copy(update={"dispatch_timeout": 120}), WRONG_PASSWORD
    )
    assert isinstance(error.__cause__, BrokerRefused)
    assert "'guest'" in str(error)
    assert "ACCESS_REFUSED" in str(error)
    assert "not-the-password" not in str(error)


async def test_a_missing_vhost_is_refused_naming_the_vhost(settings: Settings) -> None:
    error = await _dispatch_error(
        settings.model_copy(update={"dispatch_timeout": 120}), MISSING_VHOST
    )
    assert isinstance(error.__cause__, BrokerRefused)
    assert "'pigeon-no-such-vhost-3f9a'" in str(error)
    assert "'guest'" in str(error)
    assert len(str(error).splitlines()) == 1


async def test_a_tls_failure_is_refused_at_once(settings: Settings) -> None:
    error = await _dispatch_error(
        settings.model_copy(update={"dispatch_timeout": 120}), TLS_ON_PLAIN_PORT
    )
    assert isinstance(error.__cause__, BrokerRefused)
    assert "TLS" in str(error)
    assert ":guest@" not in str(error)


async def test_a_refused_connection_is_still_retried_as_an_outage(settings: Settings) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    with structlog.testing.capture_logs() as logs:
        error = await _dispatch_error(settings.model_copy(update={"dispatch_timeout": 1.0}), url)
    assert not isinstance(error.__cause__, BrokerRefused)
    assert "within 1s" in str(error)
    assert any(entry["event"] == "dispatch.retrying" for entry in logs)


def test_pigeon_listen_exits_78_with_one_line_on_a_missing_vhost(
    settings: Settings, tmp_path: Path
) -> None:
    env = {**settings_env(settings), "PIGEON_URL": MISSING_VHOST, "PIGEON_SERVICE": "fc"}
    result = subprocess.run(
        [*PIGEON, "listen", "tests.apps.recorder:app"],
        env={**env, "PYTHONPATH": str(ROOT), "RECORDER_FILE": str(tmp_path / "rec.txt")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78, result.stderr
    mine = [line for line in result.stderr.splitlines() if line.startswith("pigeon: ")]
    assert len(mine) == 1, result.stderr
    assert "pigeon-no-such-vhost-3f9a" in mine[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# -- 4: bad settings are one line naming the variable -----------------------------------

BAD_SETTINGS = [
    ("PIGEON_DISPATCH_TIMEOUT", "abc", "number"),
    ("PIGEON_LOG_FORMAT", "pretty", "'console' or 'json'"),
    ("PIGEON_LOG_LEVEL", "LOUD", "DEBUG, INFO"),
    ("PIGEON_URL", "http://guest:secret@127.0.0.1:5672/", "amqp://"),
    ("PIGEON_URL", "amqp://guest:guest@127.0.0.1:5672/,http://other/", "'http://other/'"),
]


@pytest.mark.parametrize(("variable", "value", "accepts"), BAD_SETTINGS)
@pytest.mark.parametrize(
    "command",
    [["dispatch", "first.contact", "{}"], ["listen", "tests.apps.recorder:app"]],
    ids=["dispatch", "listen"],
)
def test_an_invalid_setting_is_one_line_naming_the_variable(
    command: list[str], variable: str, value: str, accepts: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    env.update({variable: value, "PIGEON_SERVICE": "fc", "PYTHONPATH": str(ROOT)})
    result = subprocess.run(
        [*PIGEON, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pigeon: {variable}=")
    assert accepts in lines[0]
    assert "secret" not in lines[0]


def test_an_invalid_setting_raises_a_settings_error_in_the_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIGEON_DISPATCH_TIMEOUT", "abc")
    with pytest.raises(SettingsError, match=r"^PIGEON_DISPATCH_TIMEOUT='abc' is invalid"):
        Pigeon(service="first-contact")


def test_letterthief_refuses_an_invalid_setting_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIGEON_", "LETTERTHIEF_"))}
    env["LETTERTHIEF_ALERT_INTERVAL"] = "often"
    env["LETTERTHIEF_DATABASE_URL"] = f"sqlite:///{tmp_path}/lt.db"
    result = subprocess.run(
        [sys.executable, "-m", "letterthief", "list"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if "LETTERTHIEF_ALERT_INTERVAL" in line
    ]


# -- 7: a plain install's letterthief names the extra -------------------------------------

BLOCKER = """
import sys

class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "uvicorn":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Missing())
"""


def test_letterthief_without_its_extra_says_which_extra_to_install(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    command = Path(sys.executable).parent / "letterthief"
    result = subprocess.run(
        [str(command), "--help"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "letterthief: the letterthief extra is not installed (no module uvicorn): "
        "pip install 'pigeon-bus[letterthief]'"
    ]


# -- 5: handler signatures are checked at registration ----------------------------------


class Placed(Event, name="first-contact.placed"):
    order_id: str


def _app() -> Pigeon:
    return Pigeon(service="first-contact", settings=Settings(idempotency_url="memory://"))


async def test_a_context_first_handler_gets_its_arguments_by_annotation() -> None:
    app = _app()
    seen: list[tuple[object, object]] = []

    @app.listener(Placed)
    async def placed(ctx: Context, event: Placed) -> None:
        seen.append((ctx, event))

    outcome = await deliver(app, Placed(order_id="o-1"))
    assert outcome.acked, outcome
    ((ctx, event),) = seen
    assert isinstance(ctx, Context)
    assert event == Placed(order_id="o-1")


def test_a_keyword_only_context_is_refused_naming_the_handler_and_the_shapes() -> None:
    app = _app()

    async def placed(event: Placed, *, ctx: Context) -> None: ...

    with pytest.raises(ConfigurationError) as caught:
        app.listener(Placed)(placed)
    message = str(caught.value)
    assert "placed" in message
    assert "keyword-only parameter ctx" in message
    assert "(event, ctx)" in message


@pytest.mark.parametrize(
    "handler",
    [
        lambda: None,
        lambda event, ctx, extra: None,
    ],
    ids=["no-parameters", "three-parameters"],
)
def test_a_handler_with_the_wrong_arity_is_refused(handler: Callable[..., None]) -> None:
    with pytest.raises(ConfigurationError, match="accepted shapes"):
        _app().listener(Placed, name="wrong")(handler)


def test_two_context_parameters_are_refused() -> None:
    async def placed(a: Context, b: Context) -> None: ...

    with pytest.raises(ConfigurationError, match="only one parameter may be annotated Context"):
        _app().listener(Placed)(placed)


def test_a_fallback_with_the_wrong_arity_is_refused_at_registration() -> None:
    app = _app()

    @app.listener(Placed)
    async def placed(event: Placed) -> None: ...

    async def gave_up(event: Placed, ctx: Context) -> None: ...

    with pytest.raises(ConfigurationError, match=r"fallback .*gave_up.* \(event, ctx, error\)"):
        placed.fallback(gave_up)  # type: ignore[arg-type]


# -- 6: sync handlers honour --shutdown-timeout ------------------------------------------


def _sync_listener(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    return start_listener(env, *args, log=log, app="tests.apps.sync_recorder:app")


async def test_a_slow_sync_handler_does_not_outlive_the_shutdown_timeout(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    app = make_app("sync")
    broker.queues.add(f"{app.service}.record-sync")  # and its retry tiers
    rec, log = tmp_path / "rec.txt", tmp_path / "listen.log"
    env = env_for(app.settings, app.service or "", RECORDER_FILE=str(rec), RECORDER_SECONDS="60")
    proc = _sync_listener(env, log, "--shutdown-timeout", "2")
    try:
        wait_for_log(log, "worker.consuming")
        message_id = await app.dispatch_async("test.order.placed", {"n": 1})
        wait_recorded(rec, 1, kind="start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0  # the handler sleeps 60 s
    finally:
        stop(proc)
    assert recorded(rec, "done") == []
    again = _sync_listener({**env, "RECORDER_SECONDS": "0"}, log)  # the message was not acked
    try:
        assert wait_recorded(rec, 1, kind="done") == [message_id]
    finally:
        stop(again)


async def test_a_sync_handler_that_finishes_within_the_timeout_is_acked(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    app = make_app("sync")
    queue = f"{app.service}.record-sync"
    broker.queues.add(f"{app.service}.record-sync")  # and its retry tiers
    rec, log = tmp_path / "rec.txt", tmp_path / "listen.log"
    env = env_for(app.settings, app.service or "", RECORDER_FILE=str(rec), RECORDER_SECONDS="1")
    proc = _sync_listener(env, log, "--shutdown-timeout", "30")
    try:
        wait_for_log(log, "worker.consuming")
        message_id = await app.dispatch_async("test.order.placed", {"n": 1})
        wait_recorded(rec, 1, kind="start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)
    assert recorded(rec, "done") == [message_id]
    assert await broker.count(queue) == 0


# -- 8: the other edges -----------------------------------------------------------------


def _pigeon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    return subprocess.run(
        [*PIGEON, *args],
        env={**base, "PIGEON_SERVICE": "fc", **(env or {}), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _taken_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder


def test_pigeon_has_a_version() -> None:
    result = _pigeon("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"pigeon, version \d+\.\d+\.\d+\S*\n", result.stdout)


def test_a_taken_metrics_port_is_one_line() -> None:
    with _taken_port() as holder:
        port = str(holder.getsockname()[1])
        result = _pigeon(
            "listen",
            "tests.apps.recorder:app",
            "--metrics-port",
            port,
            "--metrics-host",
            "127.0.0.1",
        )
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("pigeon: ")]
    assert f"127.0.0.1:{port}" in line
    assert "--metrics-port" in line


def test_letterthief_refuses_a_taken_port_before_it_says_serving(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIGEON_", "LETTERTHIEF_"))}
    env["LETTERTHIEF_DATABASE_URL"] = f"sqlite:///{tmp_path}/lt.db"
    with _taken_port() as holder:
        port = str(holder.getsockname()[1])
        result = subprocess.run(
            [sys.executable, "-m", "letterthief", "serve", "--port", port],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert "serving" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot serve on 127.0.0.1:{port} (Address already in use): pick a free --port"
    ]


def test_a_header_without_a_value_is_refused() -> None:
    result = _pigeon("dispatch", "first.contact", "{}", "--header", "novalue")
    assert result.returncode == 2
    assert "'novalue' is not KEY=VALUE" in result.stderr


def test_a_missing_attribute_is_named() -> None:
    result = _pigeon("listen", "tests.apps.recorder:nope")
    assert result.returncode == 2
    assert "has no attribute 'nope'" in result.stderr


def test_two_event_classes_cannot_share_a_name() -> None:
    class First(Event, name="first-contact.duplicate"):
        a: int

    with pytest.raises(ConfigurationError, match=r"'first-contact.duplicate' is taken by .*First"):

        class Second(Event, name="first-contact.duplicate"):
            b: int

    assert lookup("first-contact.duplicate") is First


async def test_a_second_worker_on_the_same_queue_logs_a_hint(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    apps = [make_app("twice"), make_app("twice")]
    for app in apps:

        @app.listener("first-contact.twice", name="twice")
        async def twice(payload: dict[str, object]) -> None: ...

    await run_worker(apps[0])
    with structlog.testing.capture_logs() as logs:
        await run_worker(apps[1])
    (hint,) = [entry for entry in logs if entry["event"] == "worker.competing_consumers"]
    assert hint["consumers"] == 2
    assert hint["queue"] == apps[1].listeners[0].queue


async def test_the_first_failed_try_logs_attempt_1(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("fails")
    tries: list[int] = []

    @app.listener("first-contact.fails", retry=Retry(attempts=2, delays=[0.25]))
    async def fails(payload: dict[str, object], ctx: Context) -> None:
        tries.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")

    await run_worker(app)
    with structlog.testing.capture_logs() as logs:
        await app.dispatch_async("first-contact.fails", {})
        await eventually(lambda: len(tries) == 2)
        await eventually(lambda: sum(e["event"] == "message.handled" for e in logs) == 2)
    handled = [entry for entry in logs if entry["event"] == "message.handled"]
    assert [(e["outcome"], e["attempt"]) for e in handled] == [("retried", 1), ("acked", 2)]
    assert handled[0]["next_attempt"] == 2


async def test_deliver_gives_the_message_a_correlation_id() -> None:
    app = _app()
    seen: list[Context] = []

    @app.listener(Placed)
    async def placed(event: Placed, ctx: Context) -> None:
        seen.append(ctx)

    await deliver(app, Placed(order_id="o-2"))
    (ctx,) = seen
    assert ctx.correlation_id == ctx.message_id
    assert ctx.correlation_id is not None


def test_letterthief_keeps_one_database_whatever_the_directory(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIGEON_", "LETTERTHIEF_")) and k != "XDG_DATA_HOME"
    }
    env["HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-m", "letterthief", "list"],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    database = home / ".local" / "share" / "letterthief" / "letterthief.db"
    assert result.stderr.splitlines()[0] == f"letterthief: database sqlite:///{database}"
    assert database.exists()
    assert list(elsewhere.iterdir()) == []


# -- 9: pigeon dispatch validates with --app ----------------------------------------------


def test_dispatch_without_a_payload_or_an_app_is_refused() -> None:
    result = _pigeon("dispatch", "first.contact")
    assert result.returncode == 2
    assert "PAYLOAD" in result.stderr
    assert "--app" in result.stderr


def test_dispatch_with_an_app_refuses_a_payload_that_does_not_fit() -> None:
    result = _pigeon(
        "dispatch", "test.first-contact.shipped", '{"order_id": "o-1"}', "--app", "tests.apps.typed"
    )
    assert result.returncode == 2
    assert "does not match Shipped: parcels: Field required" in result.stderr


async def test_dispatch_with_an_app_publishes_the_validated_event(
    settings: Settings, broker: Broker
) -> None:
    broker.track(settings)
    result = _pigeon(
        "dispatch",
        "test.first-contact.shipped",
        '{"order_id": "o-1", "parcels": "2"}',
        "--app",
        "tests.apps.typed:app",
        env=settings_env(settings),
    )
    assert result.returncode == 0, result.stderr
    assert UUID.match(result.stdout.strip())
    message = await broker.get(settings.unrouted_queue)
    assert message.message_id == result.stdout.strip()
    assert json.loads(message.body) == {"order_id": "o-1", "parcels": 2}
    assert (message.headers or {})["x-pigeon-event-version"] == 2


async def test_letterthiefs_collector_reports_a_refused_login_and_keeps_trying(
    settings: Settings, tmp_path: Path
) -> None:
    from letterthief.collector import Collector
    from letterthief.store import Store
    from tests.letterthief.conftest import lt_settings

    url = f"sqlite:///{tmp_path / 'letterthief.db'}"
    async with Store(url) as store:
        collector = Collector(
            store, settings.model_copy(update={"url": WRONG_PASSWORD}), lt_settings(url)
        )
        task = asyncio.create_task(collector.run())
        try:
            await eventually(lambda: collector.error is not None, message="the refusal reported")
            assert "refused user 'guest'" in (collector.error or "")
            assert not task.done()  # still trying: a fixed permission needs no restart
        finally:
            collector.stop()
            await asyncio.wait_for(task, 20)


async def test_dispatch_logs_every_failed_try_counting_from_1(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries: list[int] = []

    async def fails(self: Publisher, outgoing: object, timeout: float) -> None:
        tries.append(1)
        raise ConnectionError("the broker is away")

    monkeypatch.setattr(Publisher, "_publish_once", fails)
    with structlog.testing.capture_logs() as logs:
        await _dispatch_error(settings.model_copy(update={"dispatch_timeout": 1.0}), AMQP_URL)
    logged = [entry["attempt"] for entry in logs if entry["event"] == "dispatch.retrying"]
    assert logged == list(range(1, len(tries)))  # the last try raises instead of retrying
    assert len(tries) >= 2


def test_pigeon_dispatch_prints_the_message_id_alone(settings: Settings, broker: Broker) -> None:
    broker.track(settings)
    result = _pigeon("dispatch", "first.contact", '{"n": 1}', env=settings_env(settings))
    assert result.returncode == 0, result.stderr
    assert UUID.match(result.stdout.rstrip("\n"))
    assert result.stdout.count("\n") == 1
