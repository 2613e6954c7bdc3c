"""Operating the outbox: status, metrics, retention, and a relay facing a dead broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY
from sqlalchemy import Engine, create_engine, insert, select, text, update
from sqlalchemy.orm import Session

from pigeon import Pigeon
from pigeon.cli import main
from pigeon.messages import Outgoing
from pigeon.outbox import Outbox, Relay, purge
from tests.conftest import unique_settings
from tests.outbox_support import pg_name, pg_url
from tests.outboxkit import Shipped

__all__ = ["pg_name"]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'ops.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def box(engine: Engine, prefix: str) -> Outbox:
    box = Outbox(engine, app=Pigeon("shop", settings=unique_settings(prefix)))
    box.create_tables()
    return box


def test_status_prints_the_pending_rows_and_the_oldest_age(engine: Engine, box: Outbox) -> None:
    with Session(engine) as s, s.begin():
        box.dispatch(s, Shipped(order_id="o-1"))
        box.dispatch(s, Shipped(order_id="o-2"))
    with Session(engine) as s, s.begin():
        s.execute(update(box.table).values(created_at=time.time() - 90))

    result = CliRunner().invoke(main, ["outbox", "status", str(engine.url)])

    assert result.exit_code == 0, result.output
    lines = dict(line.split(" ", 1) for line in result.output.splitlines())
    assert lines["pending"] == "2"
    assert 89 <= float(lines["oldest_age_seconds"]) < 200


def test_status_names_the_urls_that_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["outbox", "status", "mysql://app@db/shop"])

    assert result.exit_code == 78
    assert "postgresql+psycopg://, postgresql+asyncpg:// or sqlite:///path" in result.output


async def test_metrics_report_pending_rows_and_lag(engine: Engine, box: Outbox) -> None:
    with Session(engine) as s, s.begin():
        box.dispatch(s, Shipped(order_id="o-1"))
        s.execute(update(box.table).values(created_at=time.time() - 30))

    await Relay(box).measure()
    await box.close()

    labels = {"table": "pigeon_outbox"}
    assert REGISTRY.get_sample_value("pigeon_outbox_pending", labels) == 1
    lag = REGISTRY.get_sample_value("pigeon_outbox_lag_seconds", labels)
    assert lag is not None
    assert lag >= 29


async def test_retention_purges_old_published_rows_and_old_inbox_entries(
    engine: Engine, box: Outbox
) -> None:
    box.retention, box.inbox_retention = 60, 3600
    now = time.time()
    with Session(engine) as s, s.begin():
        old = box.dispatch(s, Shipped(order_id="old"))
        recent = box.dispatch(s, Shipped(order_id="recent"))
        pending = box.dispatch(s, Shipped(order_id="pending"))
        s.execute(
            update(box.table).where(box.table.c.message_id == old).values(published_at=now - 61)
        )
        s.execute(
            update(box.table).where(box.table.c.message_id == recent).values(published_at=now - 59)
        )
        s.execute(insert(box.inbox), [
            {"queue": "q", "message_id": "gone", "created_at": now - 3601},
            {"queue": "q", "message_id": "kept", "created_at": now - 3599},
        ])  # fmt: skip

    assert await purge(box) == (1, 1)
    await box.close()

    with engine.connect() as conn:
        assert set(conn.execute(select(box.table.c.message_id)).scalars()) == {recent, pending}
        assert set(conn.execute(select(box.inbox.c.message_id)).scalars()) == {"kept"}


async def test_a_dead_broker_makes_the_relay_back_off_and_keep_the_row(
    engine: Engine, box: Outbox, prefix: str
) -> None:
    dead = Pigeon(
        "shop",
        settings=unique_settings(
            prefix, url="amqp://guest:guest@127.0.0.1:1/", dispatch_timeout=0.2
        ),
    )
    with Session(engine) as s, s.begin():
        box.dispatch(s, Shipped(order_id="o-1"))
    relay = Relay(box, app=dead, max_backoff=1.0)
    started = time.monotonic()
    task = asyncio.create_task(relay.run())
    try:
        deadline = started + 30
        while relay._failures < 3:
            assert time.monotonic() < deadline, "the relay did not retry"
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        relay.stop("test finished")
        assert await asyncio.wait_for(task, 30) == 0
        await dead.close()
        await box.close()
    # 0.5 s, then 1 s (each ±20%) between the three tries: backing off, not hammering
    assert elapsed >= 0.4 + 0.8
    with engine.connect() as conn:
        row = conn.execute(select(box.table.c.published_at, box.table.c.claimed_by)).one()
    assert row == (None, None)  # given back, still pending


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_status_takes_either_postgres_url_form(pg_name: str, prefix: str, driver: str) -> None:
    engine = create_engine(pg_url(pg_name))
    box = Outbox(engine, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}")
    box.create_tables()
    try:
        with Session(engine) as s, s.begin():
            box.dispatch(s, "outbox.test.untyped", {"n": 1}, app=Pigeon("shop"))
        url = pg_url(pg_name, driver)
        result = CliRunner().invoke(main, ["outbox", "status", url, "--table", f"ob_{prefix}"])
    finally:
        box.metadata.drop_all(engine)
        engine.dispose()
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "pending 1"


async def test_a_relay_under_the_testing_fake_hands_its_events_to_the_fake(
    engine: Engine, box: Outbox
) -> None:
    import pigeon.testing

    with Session(engine) as s, s.begin():
        message_id = box.dispatch(s, Shipped(order_id="o-7", seq=3), correlation_id="c-7")
    with pigeon.testing.fake() as bus:
        assert await Relay(box).relay_once() == 1
    await box.close()

    (sent,) = bus.dispatched(Shipped)
    assert sent.message_id == message_id
    assert sent.correlation_id == "c-7"
    assert sent.payload == {"order_id": "o-7", "seq": 3}


async def test_on_postgres_the_rows_of_a_relay_that_died_mid_batch_are_free_at_once(
    pg_name: str, prefix: str
) -> None:
    """The batch's lock dies with its connection: no lease to wait out (here 10 minutes)."""
    from pigeon.app import set_sink

    engine = create_engine(pg_url(pg_name))
    box = Outbox(engine, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}", lease=600)
    box.create_tables()
    with Session(engine) as s, s.begin():
        ids = [box.dispatch(s, Shipped(order_id="o-1", seq=n), key="o-1") for n in (1, 2, 3)]
    published: list[str] = []
    stuck = asyncio.Event()

    async def sink(out: Outgoing) -> str:
        if not stuck.is_set():  # the first relay's publish never returns
            stuck.set()
            await asyncio.Event().wait()
        published.append(out.message_id)
        return out.message_id

    previous = set_sink(sink)
    dying = asyncio.create_task(Relay(box).relay_once())
    try:
        await asyncio.wait_for(stuck.wait(), 20)
        with engine.connect() as conn:  # the dying relay's connections go away
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND query ILIKE :table"
                ),
                {"table": f"%ob_{prefix}%"},
            )
        other = Outbox(engine, table=f"ob_{prefix}", inbox_table=f"ib_{prefix}", lease=600)
        assert await Relay(other).relay_once() == 3
        await other.close()
    finally:
        dying.cancel()
        await asyncio.gather(dying, return_exceptions=True)
        set_sink(previous)
        await box.close()
        box.metadata.drop_all(engine)
        engine.dispose()
    assert published == ids
