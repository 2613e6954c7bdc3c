"""kill -9 of the relay and of the consumer at random points: every committed event takes
effect exactly once, and no rolled-back one ever does (PostgreSQL and SQLite, real RabbitMQ)."""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session

from pigeon import Pigeon
from pigeon.outbox import Outbox
from pigeon.settings import Settings
from tests.conftest import Broker
from tests.outbox_support import effects_table, pg_name, pg_url
from tests.outboxkit import Shipped
from tests.procs import PIGEON, ROOT, env_for, wait_for_log

__all__ = ["pg_name"]

pytestmark = pytest.mark.slow

EVENTS = 1000
PER_TRANSACTION = 10
LEASE = "2"


class Proc:
    """A subprocess that can be killed -9 and started again, its output appended to ``log``."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.kills += 1

    def wait_started(self, marker: str, timeout: float = 30.0) -> None:
        """Until this incarnation logged ``marker`` (with ``{pid}``): past its start-up, where
        a SIGTERM would still find Python's default handler."""
        assert self.proc is not None
        wait_for_log(self.log, marker.format(pid=self.proc.pid), timeout)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, pg_name: str, tmp_path: Path) -> str:
    return pg_url(pg_name) if request.param == "postgresql" else f"sqlite:///{tmp_path / 'shop.db'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


def produce(engine: Engine, box: Outbox, rng: random.Random) -> set[str]:
    """1,000 committed events in transactions of ten; about every fifth one rolls back."""
    committed: set[str] = set()
    seq = 0
    while len(committed) < EVENTS:
        ids = []
        try:
            with Session(engine) as s, s.begin():
                for _ in range(PER_TRANSACTION):
                    seq += 1
                    ids.append(box.dispatch(s, Shipped(order_id=f"o-{seq % 37}", seq=seq)))
                if rng.random() < 0.2:
                    raise LookupError("rolled back")
        except LookupError:
            continue
        committed.update(ids)
        time.sleep(rng.uniform(0, 0.02))
    return committed


def killer(procs: list[Proc], rng: random.Random, until: threading.Event) -> None:
    """kill -9 one of ``procs`` at a random moment, start it again; until told to stop."""
    while not until.wait(rng.uniform(0.3, 1.2)):
        victim = rng.choice(procs)
        victim.kill()
        victim.start()


def test_kill_9_of_relay_and_consumer_loses_and_repeats_nothing(
    engine: Engine, db_url: str, prefix: str, settings: Settings, broker: Broker, tmp_path: Path
) -> None:
    service = f"{prefix}-consumer"
    box = Outbox(
        engine,
        table=f"ob_{prefix}",
        inbox_table=f"ib_{prefix}",
        app=Pigeon(service, settings=settings),
    )
    box.create_tables()
    metadata, effects = effects_table(prefix)
    metadata.create_all(engine)
    mirror = Pigeon(service=service, settings=settings)  # for the broker cleanup
    mirror.listener("outbox.test.shipped", name="apply")(lambda payload, ctx: None)
    broker.apps.append(mirror)
    env = env_for(
        settings,
        service,
        OUTBOX_TEST_DB=db_url,
        OUTBOX_TEST_PREFIX=prefix,
        OUTBOX_TEST_LEASE=LEASE,
    )
    consumer = Proc(
        [*PIGEON, "listen", "tests.apps.outbox_consumer:app"], env, tmp_path / "consumer.log"
    )
    relay = Proc(
        [*PIGEON, "outbox", "relay", db_url, "--table", f"ob_{prefix}",
         "--inbox-table", f"ib_{prefix}", "--lease", LEASE, "--batch-size", "50"],
        env,
        tmp_path / "relay.log",
    )  # fmt: skip
    consumer.start()
    wait_for_log(consumer.log, "worker.consuming")
    relay.start()
    rng = random.Random()
    stop_killing = threading.Event()
    chaos = threading.Thread(target=killer, args=([relay, consumer], rng, stop_killing))
    chaos.start()
    try:
        committed = produce(engine, box, rng)
        deadline = time.monotonic() + 120
        handled = 0
        while handled < EVENTS and time.monotonic() < deadline:
            if relay.kills + consumer.kills >= 6:
                stop_killing.set()
            with engine.connect() as conn:
                handled = conn.execute(select(func.count()).select_from(effects)).scalar_one()
            time.sleep(0.2)
        stop_killing.set()
        chaos.join()
        deadline = time.monotonic() + 60
        while handled < EVENTS and time.monotonic() < deadline:
            with engine.connect() as conn:
                handled = conn.execute(select(func.count()).select_from(effects)).scalar_one()
            time.sleep(0.2)
        with engine.connect() as conn:
            rows = conn.execute(select(effects.c.message_id)).scalars().all()
        relay.wait_started(f'"relay": "{socket.gethostname()}:{{pid}}:')  # host:pid:random
        consumer.wait_started('"pid": {pid}')
        assert relay.stop() == 0
        assert consumer.stop() == 0
    finally:
        stop_killing.set()
        for proc in (relay, consumer):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait()
    assert relay.kills + consumer.kills >= 2, "the killer never struck"
    assert len(rows) == len(set(rows)), "an event took effect twice"
    assert set(rows) == committed
