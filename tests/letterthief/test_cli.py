"""The ``letterthief`` command line, run in-process with click's runner."""

from __future__ import annotations

import asyncio
import json

import aio_pika
from click.testing import CliRunner

from letterthief.cli import main
from letterthief.models import Status
from letterthief.store import Store
from tests import leaks
from tests.conftest import AMQP_URL
from tests.letterthief.conftest import received


def _seed(url: str, *letters: object) -> list[int]:
    async def go() -> list[int]:
        async with Store(url) as store:
            stored = await store.ingest(list(letters))  # type: ignore[arg-type]
            return [s.letter_id for s in stored]

    return asyncio.run(go())


def _status(url: str, letter_id: int) -> str:
    async def go() -> str:
        async with Store(url) as store:
            letter = await store.get(letter_id)
            assert letter is not None
            return letter.status

    return asyncio.run(go())


def test_serve_refuses_a_public_address_without_credentials(sqlite_url: str) -> None:
    result = CliRunner().invoke(
        main,
        ["serve", "--host", "0.0.0.0"],
        env={"LETTERTHIEF_DATABASE_URL": sqlite_url, "LETTERTHIEF_USERNAME": "",
             "LETTERTHIEF_PASSWORD": ""},
    )  # fmt: skip
    assert result.exit_code == 2
    assert "LETTERTHIEF_USERNAME and LETTERTHIEF_PASSWORD" in result.output


def test_list_show_archive_and_restore_work_on_the_database(sqlite_url: str) -> None:
    first, _ = _seed(sqlite_url, received("cli-1", queue="billing.charge"), received("cli-2"))
    env = {"LETTERTHIEF_DATABASE_URL": sqlite_url}
    runner = CliRunner()
    listed = runner.invoke(main, ["list", "--queue", "billing.charge"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "1 letter(s)" in listed.output
    assert "billing.charge" in listed.output
    as_json = runner.invoke(main, ["list", "--json"], env=env)
    assert {json.loads(line)["message_id"] for line in as_json.stdout.splitlines()} == {
        "cli-1",
        "cli-2",
    }
    shown = runner.invoke(main, ["show", str(first)], env=env)
    assert shown.exit_code == 0, shown.output
    assert "ValueError: no partner for region" in shown.output
    assert '"order_id": "o-1"' in shown.output
    archived = runner.invoke(main, ["archive", str(first), "999"], env=env)
    assert "archived 1 of 2" in archived.output
    assert _status(sqlite_url, first) == Status.ARCHIVED
    assert runner.invoke(main, ["restore", str(first)], env=env).exit_code == 0
    assert _status(sqlite_url, first) == Status.OPEN
    missing = runner.invoke(main, ["show", "424242"], env=env)
    assert missing.exit_code == 1
    assert "there is no letter 424242" in missing.output


def test_retry_by_queue_publishes_every_open_letter_of_it(sqlite_url: str) -> None:
    queue = f"{leaks.new_prefix(__name__)}.cli-target"

    async def declare(delete: bool = False) -> int:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, durable=True)
            count = declared.declaration_result.message_count or 0
            if delete:
                await channel.queue_delete(queue)
            return count
        finally:
            await connection.close()

    asyncio.run(declare())
    try:
        ids = _seed(sqlite_url, *(received(f"q-{i}", queue=queue) for i in range(3)))
        env = {"LETTERTHIEF_DATABASE_URL": sqlite_url, "PIGEON_URL": AMQP_URL}
        result = CliRunner().invoke(main, ["retry", "--queue", queue], env=env)
        assert result.exit_code == 0, result.output
        assert "3 sent, 0 failed" in result.output
        assert all(_status(sqlite_url, i) == Status.RETRIED for i in ids)
    finally:
        assert asyncio.run(declare(delete=True)) == 3


def test_retry_of_a_letter_whose_queue_is_gone_fails_with_the_fix(sqlite_url: str) -> None:
    (letter_id,) = _seed(sqlite_url, received("gone", queue=f"{leaks.new_prefix(__name__)}.gone"))
    env = {"LETTERTHIEF_DATABASE_URL": sqlite_url, "PIGEON_URL": AMQP_URL}
    result = CliRunner().invoke(main, ["retry", str(letter_id)], env=env)
    assert result.exit_code == 1
    assert "does not exist" in result.output
    assert "Start the service that owns the queue" in result.output
    assert _status(sqlite_url, letter_id) == Status.OPEN
