"""LetterThief against letters built from raw AMQP frames, as an outside tester would send."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from letterthief.service import LetterThief
from pigeon.settings import Settings
from tests.conftest import Broker
from tests.hostile import get
from tests.letterthief.conftest import letters_when, lt_settings
from tests.letterthief.test_hardening import api, declare
from tests.letterthief.test_web import log_in
from tests.rawamqp import (
    DELIVERY_MODE,
    HEADERS,
    MESSAGE_ID,
    Raw,
    array,
    longstr,
    publish_raw,
    shortstr,
)
from tests.rawamqp import table as raw_table


def _letter(queue: str, message_id: bytes, *fields: tuple[bytes, bytes]) -> Raw:
    pigeon = [
        (b"x-pigeon-reason", b"S" + longstr(b"handler-error")),
        (b"x-pigeon-queue", b"S" + longstr(queue.encode())),
    ]
    props = [(DELIVERY_MODE, b"\x02"), (MESSAGE_ID, shortstr(message_id))]
    return Raw(queue.encode(), b'{"n": 1}', [*props, (HEADERS, raw_table(*pigeon, *fields))])


async def test_a_negative_decimal_header_is_stored_and_replayed_as_sent(
    thief: LetterThief, settings: Settings, broker: Broker
) -> None:
    queue = await declare(broker, f"{broker.prefix}.charge")
    price = (b"x-price", b"D\x02" + struct.pack(">i", -150))
    await publish_raw(settings.dead_letter_exchange, [_letter(queue, b"neg-dec", price)])
    (letter,) = await letters_when(thief.store, 1)
    async with api(thief) as client:
        detail = (await client.get(f"/api/dead-letters/{letter.id}")).json()
        assert "42949671" not in str(detail["headers"]), detail["headers"]
        response = await client.post(f"/api/dead-letters/{letter.id}/retry")
        assert response.status_code == 200, response.text
    properties, _ = await get(queue)
    assert properties.headers["x-price"] == Decimal("-1.50")


def _deep_array(depth: int) -> bytes:
    value = b"V"
    for _ in range(depth):
        value = b"A" + array(value)
    return value


#: a header value of every field type RabbitMQ accepts, at an edge of its range
TYPED = {
    "b": b"b\xff",
    "B": b"B\xff",
    "s": b"s\x80\x00",
    "u": b"u\xff\xff",
    "I": b"I\x80\x00\x00\x00",
    "i": b"i\xff\xff\xff\xff",
    "l": b"l\x80" + b"\x00" * 7,
    "L": b"L" + b"\xff" * 8,
    "f": b"f" + struct.pack(">f", -3.4e38),
    "d": b"d" + struct.pack(">d", -0.0),
    "D-scale-255": b"D\xff" + struct.pack(">i", 1),
    "T-zero": b"T" + struct.pack(">Q", 0),
    "T-far": b"T" + struct.pack(">Q", 2**62),
    "x": b"x" + longstr(b"\x00\xff"),
    "t": b"t\x02",
    "V": b"V",
    "S-not-utf-8": b"S" + longstr(b"\xff\xfe"),
    "F-key-not-utf-8": b"F" + raw_table((b"k\xff", b"t\x01")),
    "A-mixed": b"A" + array(b"b\x01", b"S" + longstr(b"\xc3("), b"F" + raw_table((b"n", b"V"))),
    "A-3000-deep": _deep_array(3000),
    "F-dollar-keys": b"F" + raw_table((b"$bytes", b"S" + longstr(b"!!")), (b"$decimal", b"V")),
}


@pytest.fixture
async def any_thief(
    settings: Settings, database_url: str, broker: Broker
) -> AsyncIterator[LetterThief]:
    """A started LetterThief on SQLite and on PostgreSQL."""
    broker.track(settings)
    service = LetterThief(lt_settings(database_url), settings)
    await service.start()
    try:
        await asyncio.wait_for(service.collector.ready.wait(), 20)
        yield service
    finally:
        await service.stop()


async def test_letters_of_every_field_type_are_shown_and_replayed_or_refused(
    any_thief: LetterThief, settings: Settings, broker: Broker
) -> None:
    thief = any_thief
    queue = await declare(broker, f"{broker.prefix}.charge")
    raws = [_letter(queue, f"t-{n}".encode(), (b"x-h", v)) for n, v in TYPED.items()]
    raws += [_letter(queue, b"m" * 255), _letter(queue, b"\xff\xfe"), _letter(queue, b"")]
    await publish_raw(settings.dead_letter_exchange, raws)
    letters = await letters_when(thief.store, len(raws))
    sent = 0
    async with (
        api(thief) as client,
        httpx.AsyncClient(
            transport=client._transport, base_url="http://letterthief.test"
        ) as browser,
    ):
        await log_in(browser)
        for letter in letters:
            assert (await client.get(f"/api/dead-letters/{letter.id}")).status_code == 200
            page = await browser.get(f"/letters/{letter.id}")
            assert page.status_code == 200, (letter.message_id, page.text[-500:])
            response = await client.post(f"/api/dead-letters/{letter.id}/retry")
            assert response.status_code in (200, 409, 422), (letter.message_id, response.text)
            sent += response.status_code == 200
        await publish_raw(settings.dead_letter_exchange, [_letter(queue, b"good")])
        (good,) = [
            x for x in await letters_when(thief.store, len(raws) + 1) if x.message_id == "good"
        ]
        assert (await client.post(f"/api/dead-letters/{good.id}/retry")).status_code == 200
    assert await broker.wait_count(queue, sent + 1) == sent + 1


async def test_a_letter_whose_headers_fill_a_frame_is_refused_at_once_not_after_a_timeout(
    thief: LetterThief, settings: Settings, broker: Broker
) -> None:
    queue = await declare(broker, f"{broker.prefix}.charge")
    fields = [(f"k{i:05}".encode(), b"S" + longstr(b"vvvv")) for i in range(8186)]
    big = _letter(queue, b"big", *fields)  # fits the broker's frame, not with replay marks
    await publish_raw(settings.dead_letter_exchange, [big, _letter(queue, b"good")])
    letters = {x.message_id: x for x in await letters_when(thief.store, 2)}
    async with api(thief) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await client.post(f"/api/dead-letters/{letters['big'].id}/retry")
        assert response.status_code == 422, response.text
        assert "frame" in response.json()["detail"]
        assert loop.time() - started < 3
        good = await client.post(f"/api/dead-letters/{letters['good'].id}/retry")
        assert good.status_code == 200, good.text
    assert await broker.wait_count(queue, 1) == 1


@pytest.mark.parametrize("command", [["list"], ["serve", "--port", "5741"]])
def test_a_database_that_does_not_exist_is_one_line_not_a_traceback(
    command: list[str], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIGEON_", "LETTERTHIEF_"))}
    env["LETTERTHIEF_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:5432/attack_no_such_db"
    env["PIGEON_LOG_FORMAT"] = "json"
    result = subprocess.run(
        [sys.executable, "-m", "letterthief", *command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "attack_no_such_db" in line]
    assert any("does not exist" in line and "LETTERTHIEF_DATABASE_URL" in line for line in errors)
