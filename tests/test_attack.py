"""An outside tester's attack: messages built from raw AMQP frames.

Every message here is built byte by byte (``tests/rawamqp.py``), so its
field tables can use each type RabbitMQ accepts, not only those pika writes.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pigeon import Context, Retry, headers
from pigeon.errors import ConfigurationError, InvalidHeaderError
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.hostile import publish
from tests.procs import ROOT, env_for, run_pigeon
from tests.rawamqp import (
    DELIVERY_MODE,
    HEADERS,
    MESSAGE_ID,
    Raw,
    longstr,
    publish_raw,
    shortstr,
    table,
)


async def test_trimming_a_header_table_near_frame_max_keeps_the_attempt_count(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("ledger")
    runs: list[int] = []

    @app.listener("test.order.placed", retry=Retry(attempts=2, delays=[0.1]))
    async def book(payload: dict[str, Any], ctx: Context) -> None:
        runs.append(ctx.attempt)
        raise RuntimeError("ledger down")

    await run_worker(app)
    many = table(*((f"k{i:05}".encode(), b"S" + longstr(b"vvvv")) for i in range(7800)))
    props = [(DELIVERY_MODE, b"\x02"), (MESSAGE_ID, shortstr(b"m-many")), (HEADERS, many)]
    await publish_raw(app.settings.exchange, [Raw(b"test.order.placed", b"{}", props)])
    letter = await broker.get(app.settings.dead_letter_queue, 15)
    assert letter.headers[headers.REASON] == "handler-error"
    assert letter.headers[headers.ATTEMPTS] == 2
    assert runs == [1, 2], "the retry copy kept its attempt: no endless retry loop"
    dropped = str(letter.headers[headers.DROPPED_HEADERS]).split(",")
    assert "k00000" in dropped, "what the retry copy dropped is still named"
    assert not [key for key in dropped if key.startswith("x-pigeon-")], dropped


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("PIGEON_EXCHANGE", "", "a name"),
        ("PIGEON_EXCHANGE", "amq.events", "amq."),
        ("PIGEON_DEAD_LETTER_EXCHANGE", "amq.direct", "amq."),
        ("PIGEON_UNROUTED_QUEUE", "amq.gen-x", "amq."),
        ("PIGEON_DEAD_LETTER_QUEUE", "q" * 256, "255"),
        ("PIGEON_DISPATCH_TIMEOUT", "inf", "finite"),
    ],
)
def test_a_broker_name_the_broker_refuses_is_a_setting_error_not_an_outage(
    variable: str, value: str, accepts: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    env.update({variable: value, "PIGEON_DISPATCH_TIMEOUT": "5", "PYTHONPATH": str(ROOT)})
    env[variable] = value
    result = run_pigeon(env, "dispatch", "attack.name", "{}")
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pigeon: {variable}=")
    assert accepts in lines[0]


@pytest.mark.parametrize("value", ["bogus://x", "sqlite:/x.db", "no-scheme"])
def test_an_idempotency_url_of_no_store_is_one_line_at_listen(value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    env.update({"PIGEON_IDEMPOTENCY_URL": value, "PIGEON_SERVICE": "fc", "PYTHONPATH": str(ROOT)})
    result = run_pigeon(env, "listen", "tests.apps.recorder:app")
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pigeon: PIGEON_IDEMPOTENCY_URL=")
    assert "sqlite:///" in lines[0]


async def test_a_second_copy_of_a_finished_try_runs_nothing(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    """A crash between a retry copy's confirm and its outcome record leaves two copies of
    the next attempt; once the first is settled, the second must not run the handler, the
    fallback or write a second dead letter (seen under kill -9: 13 of 1000 ran twice)."""
    app = make_app("ledger")
    runs: list[int] = []
    fallbacks: list[str] = []

    @app.listener("test.order.placed", retry=Retry(attempts=2, delays=[0.1]))
    async def book(payload: dict[str, Any], ctx: Context) -> None:
        runs.append(ctx.attempt)
        raise RuntimeError("ledger down")

    @book.fallback
    async def gave_up(payload: dict[str, Any], ctx: Context, error: BaseException) -> None:
        fallbacks.append(ctx.message_id)

    await run_worker(app)
    copy: dict[str, Any] = {"message_id": "m-copy", "headers": {headers.ATTEMPT: 2}}
    await publish(app.settings.exchange, "test.order.placed", **copy)
    await broker.get(app.settings.dead_letter_queue)
    await publish(app.settings.exchange, "test.order.placed", **copy)
    await publish(app.settings.exchange, "test.order.placed", message_id="m-sentinel")
    sentinel = await broker.get(app.settings.dead_letter_queue)
    assert sentinel.message_id == "m-sentinel", "no second dead letter of m-copy"
    assert fallbacks == ["m-copy", "m-sentinel"]
    assert runs == [2, 1, 2], "the second copy of attempt 2 did not run the handler"


async def test_dispatch_refuses_headers_too_large_for_a_frame_without_dropping_the_connection(
    make_app: AppFactory,
) -> None:
    app = make_app("shop")
    await app.dispatch_async("test.order.placed", {}, message_id="before")
    huge = {f"k{i:05}": "vvvv" for i in range(8300)}  # 132 KB: over RabbitMQ's 128 KiB frame
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(InvalidHeaderError, match="frame") as caught:
        await app.dispatch_async("test.order.placed", {}, headers=huge)
    assert loop.time() - started < 2, "refused before publishing, not retried until the timeout"
    assert "Nothing was published" in str(caught.value)
    await app.dispatch_async("test.order.placed", {}, message_id="after")


class _Booker:
    """A handler object: an instance whose ``__call__`` is a coroutine function."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, payload: dict[str, Any], ctx: Context) -> None:
        self.seen.append(ctx.message_id)


async def test_a_callable_object_or_partial_handler_runs_for_each_message(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("ledger")
    booker = _Booker()
    partial_seen: list[str] = []

    async def book(payload: dict[str, Any], ctx: Context, into: list[str]) -> None:
        into.append(ctx.message_id)

    app.listener("test.order.placed", name="booker")(booker)
    app.listener("test.order.placed", name="partial")(functools.partial(book, into=partial_seen))
    await run_worker(app)
    await publish(app.settings.exchange, "test.order.placed", message_id="m-obj")
    await eventually(lambda: booker.seen == ["m-obj"] and partial_seen == ["m-obj"])


def test_a_generator_handler_is_refused_at_registration(make_app: AppFactory) -> None:
    app = make_app("ledger")

    async def streams(payload: dict[str, Any]) -> AsyncIterator[int]:
        yield 1

    def yields(payload: dict[str, Any]) -> Iterator[int]:
        yield 1

    for handler in (streams, yields):
        with pytest.raises(ConfigurationError, match="generator"):
            app.listener("test.order.placed")(handler)


async def test_a_plain_def_returning_a_coroutine_fails_loudly_not_acked_as_handled(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("ledger")
    ran: list[str] = []

    async def book(payload: dict[str, Any]) -> None:
        ran.append("booked")

    app.listener("test.order.placed", name="wrapped", retry=Retry(attempts=1))(
        lambda payload: book(payload)
    )
    await run_worker(app)
    await publish(app.settings.exchange, "test.order.placed", message_id="m-lambda")
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.headers[headers.REASON] == "handler-error"
    assert "async def" in str(letter.headers[headers.EXCEPTION_MESSAGE])
    assert ran == []


def test_an_idempotency_database_that_does_not_exist_stops_listen_with_one_line(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    app = make_app("ledger")
    broker.track(app.settings)
    url = "postgresql://postgres@127.0.0.1:5432/attack_no_such_db"
    env = env_for(app.settings, app.service or "", PIGEON_IDEMPOTENCY_URL=url)
    env["RECORDER_FILE"] = str(tmp_path / "rec.txt")
    result = run_pigeon(env, "listen", "tests.apps.recorder:app")
    assert result.returncode == 78, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "attack_no_such_db" in last
    assert "does not exist" in last
    assert "PIGEON_IDEMPOTENCY_URL" in last
