"""Rows the broker can never take, and handlers that commit the inbox transaction
themselves: neither may block the relay, repeat its batch mates or hide a failure.

Real RabbitMQ, SQLite and PostgreSQL (see also tests/test_attack_outbox.py, whose
tests found these defects).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, create_engine, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from pigeon import Context, DispatchManyError, Pigeon, Retry, headers
from pigeon.cli import main
from pigeon.outbox import Outbox
from pigeon.outbox.relay import Relay, failed, status
from tests.conftest import eventually
from tests.outbox_support import pg_name
from tests.outboxkit import Kit, Shipped, async_box, box, db_url, engine, kit

__all__ = ["async_box", "box", "db_url", "engine", "kit", "pg_name"]

TOO_LONG = "é" * 200  # 400 bytes: over AMQP's 255


def _store(box: Outbox, engine: Engine, orders: list[tuple[str, str]]) -> dict[str, str]:
    """Store one event per (order id, key); the order ``poison`` gets a correlation id
    no AMQP message can carry (as a row written by hand or an older Pigeon could)."""
    ids = {}
    with Session(engine) as session, session.begin():
        for order_id, key in orders:
            ids[order_id] = box.dispatch(session, Shipped(order_id=order_id), key=key)
    with engine.begin() as conn:
        conn.execute(
            update(box.table)
            .where(box.table.c.message_id == ids["poison"])
            .values(correlation_id=TOO_LONG)
        )
    return ids


async def _received(queue: object) -> list[str]:
    got = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:  # type: ignore[attr-defined]
        got.append(json.loads(message.body)["order_id"])
    return got


async def test_a_row_set_aside_keeps_its_error_holds_its_key_and_shows_in_status(kit: Kit) -> None:
    box, engine = kit.box, kit.engine
    app = kit.app("shop")
    seen = await kit.queue()
    ids = _store(box, engine, [("poison", "a"), ("a-2", "a"), ("b-1", "b")])
    relay = Relay(box, app=app)

    with capture_logs() as logs:
        assert await relay.relay_once() == 1  # no error raised: the relay goes on
        assert await relay.relay_once() == 0

    assert await _received(seen) == ["b-1"]
    errors = [entry for entry in logs if entry["event"] == "outbox.row_set_aside"]
    assert [entry["message_id"] for entry in errors] == [ids["poison"]], "logged once"
    assert "correlation id" in errors[0]["error"]
    with engine.connect() as conn:
        error = conn.execute(
            select(box.table.c.error).where(box.table.c.message_id == ids["poison"])
        ).scalar_one()
    assert "correlation id" in error
    assert (await status(box))[0] == 1, "a-2 waits behind its key's failed row"
    assert await failed(box) == 1

    with engine.begin() as conn:  # the operator's fix: repair the row, clear its error
        conn.execute(
            update(box.table)
            .where(box.table.c.message_id == ids["poison"])
            .values(correlation_id=None, error=None)
        )
    assert await relay.relay_once() == 2
    assert await _received(seen) == ["poison", "a-2"], "in key order"
    assert await failed(box) == 0


async def test_a_table_made_before_the_error_column_still_relays_around_a_bad_row(kit: Kit) -> None:
    box, engine = kit.box, kit.engine
    with engine.begin() as conn:  # the table as Pigeon made it before the column
        conn.execute(text(f"DROP INDEX ix_{box.table.name}_failed"))
        conn.execute(text(f"ALTER TABLE {box.table.name} DROP COLUMN error"))
    old = Outbox(engine, table=box.table.name, inbox_table=box.inbox.name)
    app = kit.app("shop", old)
    seen = await kit.queue()
    _store(old, engine, [("poison", "a"), ("a-2", "a"), ("b-1", "b"), ("c-1", "c")])
    relay = Relay(old, app=app)

    with capture_logs() as logs:
        for _ in range(3):
            await relay.relay_once()

    assert sorted(await _received(seen)) == ["b-1", "c-1"]
    outdated = [entry for entry in logs if entry["event"] == "outbox.table_outdated"]
    assert len(outdated) == 1
    assert "ADD COLUMN error" in outdated[0]["error"]
    assert (await status(old))[0] == 2  # the bad row and the one behind it
    assert await failed(old) is None
    await old.close()


async def test_an_async_handler_may_not_commit_the_inbox_transaction_either(
    async_box: Outbox, kit: Kit
) -> None:
    """``await ctx.session.commit()`` is refused (a handler error, retried, then
    dead-lettered with the reason), and nothing of the failed tries is committed."""
    effects = kit.effects
    app = kit.app("stock", async_box)
    runs: list[int] = []

    @app.listener(Shipped, outbox=async_box, retry=Retry(attempts=2, immediate=1))
    async def reserve(event: Shipped, ctx: Context) -> None:
        runs.append(ctx.attempt)
        await ctx.session.execute(insert(effects).values(message_id=ctx.message_id, seq=1))
        await ctx.session.commit()

    await kit.run_worker(app)
    await app.dispatch_async(Shipped(order_id="o-1"), message_id="self-commit-async")
    letter = await kit.dead_letter()
    done, marks = kit.column(effects.c.message_id), kit.column(kit.box.inbox.c.message_id)

    assert letter.headers[headers.REASON] == "handler-error"
    assert "do not commit it" in str(letter.headers[headers.EXCEPTION_MESSAGE])
    assert runs == [1, 2]
    assert (done, marks) == ([], [])


async def test_a_savepoint_in_an_inbox_handler_still_commits_with_the_message(kit: Kit) -> None:
    """Only the handler's own commit is refused: ``begin_nested()`` works, and what its
    savepoint kept commits with the inbox mark."""
    box, effects = kit.box, kit.effects
    app = kit.app("stock")

    @app.listener(Shipped, outbox=box)
    def reserve(event: Shipped, ctx: Context) -> None:
        with ctx.session.begin_nested():
            ctx.session.execute(insert(effects).values(message_id=ctx.message_id, seq=1))
        nested = ctx.session.begin_nested()
        ctx.session.execute(insert(effects).values(message_id=ctx.message_id, seq=2))
        nested.rollback()

    worker = await kit.run_worker(app)
    await app.dispatch_async(Shipped(order_id="o-1"), message_id="savepoint-1")
    await eventually(lambda: worker.counts["acked"] == 1, message="handled")
    done, marks = kit.column(effects.c.seq), kit.column(box.inbox.c.message_id)

    assert (done, marks) == ([1], ["savepoint-1"])


@pytest.mark.parametrize("form", ["sync", "async"])
async def test_storing_a_message_id_twice_says_ids_are_unique_per_outbox(
    engine: Engine, box: Outbox, async_box: Outbox, form: str
) -> None:
    """The same id twice (legal with plain ``pigeon.dispatch``) raised a raw IntegrityError
    in the caller's transaction; it is a ValueError naming the id and the rule."""
    with Session(engine) as session, session.begin():
        box.dispatch(session, Shipped(order_id="o-1"), message_id="twice-1")

    async def store_again() -> None:
        if form == "sync":
            with Session(engine) as session, session.begin():
                box.dispatch(session, Shipped(order_id="o-2"), message_id="twice-1")
            return
        async with AsyncSession(async_box.engine) as asession, asession.begin():  # type: ignore[arg-type]
            await async_box.dispatch_async(asession, Shipped(order_id="o-2"), message_id="twice-1")

    with pytest.raises(ValueError, match="twice-1") as caught:
        await store_again()

    assert "unique per outbox" in str(caught.value)
    with engine.connect() as conn:
        stored = conn.execute(select(box.table.c.body)).scalars().all()
    assert [json.loads(body)["order_id"] for body in stored] == ["o-1"]


def test_status_counts_the_rows_set_aside_apart_from_the_pending_ones(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'status.db'}")
    box = Outbox(engine)
    box.create_tables()
    with Session(engine) as session, session.begin():
        box.dispatch(session, Shipped(order_id="o-1"))
        bad = box.dispatch(session, Shipped(order_id="o-2"), key="bad")
    with engine.begin() as conn:
        conn.execute(
            update(box.table).where(box.table.c.message_id == bad).values(error="cannot be ...")
        )

    result = CliRunner().invoke(main, ["outbox", "status", str(engine.url)])
    engine.dispose()

    assert result.exit_code == 0, result.output
    lines = dict(line.split(" ", 1) for line in result.output.splitlines())
    assert (lines["pending"], lines["failed"]) == ("1", "1")


async def test_the_confirmed_rows_of_a_batch_that_failed_in_part_are_not_sent_again(
    kit: Kit,
) -> None:
    """A batch the broker confirmed only in part (one row names an exchange that does not
    exist: no confirm within the dispatch timeout) used to be given back whole, so every
    round published the confirmed rows again. Now they are marked, and only the other row
    is tried again (not set aside: the exchange may yet be declared)."""
    box, engine, prefix = kit.box, kit.engine, kit.prefix
    quick = kit.settings.model_copy(update={"dispatch_timeout": 1})
    box.app = Pigeon(f"{prefix}-shop", settings=quick)
    kit.broker.apps.append(box.app)  # closed after the test
    seen = await kit.queue()
    with Session(engine) as session, session.begin():
        lost = box.dispatch(session, Shipped(order_id="lost"), key="a")
        box.dispatch(session, Shipped(order_id="o-1"), key="b")
        box.dispatch(session, Shipped(order_id="o-2"), key="c")
    with engine.begin() as conn:
        conn.execute(
            update(box.table)
            .where(box.table.c.message_id == lost)
            .values(exchange=f"{prefix}.never-declared")
        )
    relay = Relay(box, app=box.app)

    for _ in range(2):
        with pytest.raises(DispatchManyError) as caught:
            await relay.relay_once()
        assert caught.value.unconfirmed == [lost]

    assert sorted(await _received(seen)) == ["o-1", "o-2"], "each confirmed row once"
    assert ((await status(box))[0], await failed(box)) == (1, 0)
