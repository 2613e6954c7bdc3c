"""One error tree: everything Pigeon raises on purpose is a PigeonError, and the names a
dead letter carries in ``x-pigeon-exception-type`` do not change when a class moves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pigeon
from pigeon import testing
from pigeon.deadletter import describe_exception
from pigeon.delivery import HandlerTimeout, InvalidMessage
from pigeon.errors import ConfigurationError, DispatchError, PigeonError, TopologyError
from pigeon.idempotency import open_store
from pigeon.idempotency.memory import MemoryStore
from pigeon.middleware import RateLimit, Timeout
from pigeon.retry import Reject, RetryLater

ROOT = Path(__file__).resolve().parent.parent

WIRE_NAMES: dict[Exception, str] = {
    RetryLater(1.0): "pigeon.retry.RetryLater",
    Reject("no"): "pigeon.retry.Reject",
    HandlerTimeout("slow"): "pigeon.delivery.HandlerTimeout",
    InvalidMessage("invalid-payload", "bad"): "pigeon.delivery.InvalidMessage",
    DispatchError("down"): "pigeon.errors.DispatchError",
    ConfigurationError("wrong"): "pigeon.errors.ConfigurationError",
    TopologyError("differs"): "pigeon.errors.TopologyError",
}


@pytest.mark.parametrize("error", list(WIRE_NAMES), ids=lambda e: type(e).__name__)
def test_every_error_pigeon_raises_on_purpose_is_a_pigeon_error(error: Exception) -> None:
    assert isinstance(error, PigeonError)


@pytest.mark.parametrize("error", list(WIRE_NAMES), ids=lambda e: type(e).__name__)
def test_the_exception_type_on_the_wire_is_stable(error: Exception) -> None:
    assert describe_exception(error)[0] == WIRE_NAMES[error]


async def test_a_timed_out_handler_dead_letters_under_its_old_type_name() -> None:
    app = pigeon.Pigeon(service="errors")

    @app.listener("order.placed", timeout=0.01, retry=pigeon.Retry(attempts=1))
    async def slow(payload: dict[str, object]) -> None:
        await __import__("asyncio").sleep(5)

    outcome = await testing.deliver(app, "order.placed", {})
    assert outcome.dead_lettered
    assert outcome.headers["x-pigeon-exception-type"] == "pigeon.delivery.HandlerTimeout"
    assert outcome.headers["x-pigeon-reason"] == "timeout"
    outcome = await testing.deliver(app, "order.placed", b"not json")
    assert outcome.headers["x-pigeon-exception-type"] == "pigeon.delivery.InvalidMessage"


@pytest.mark.parametrize(
    "build",
    [
        lambda: RateLimit(0),
        lambda: RateLimit(1, per=0),
        lambda: Timeout(0),
        lambda: open_store("x://"),
        lambda: open_store("idempotency"),
        lambda: open_store("sqlite://"),
        lambda: MemoryStore(retention=0),
    ],
    ids=["RateLimit(0)", "per=0", "Timeout(0)", "x://", "no-scheme", "sqlite-no-path", "retention"],
)
def test_a_wrong_setting_is_a_configuration_error_and_still_a_value_error(
    build: object,
) -> None:
    assert callable(build)
    with pytest.raises(ConfigurationError) as info:
        build()
    assert isinstance(info.value, ValueError), "code that caught ValueError still does"


def test_listen_with_an_unknown_idempotency_scheme_exits_78_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    env.update(PIGEON_SERVICE="errors-x", PIGEON_IDEMPOTENCY_URL="x://somewhere")
    proc = subprocess.run(
        [sys.executable, "-m", "pigeon", "listen", "tests.apps.recorder:app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pigeon: PIGEON_IDEMPOTENCY_URL='x://somewhere' is invalid")
