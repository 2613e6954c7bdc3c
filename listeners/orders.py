"""Orders: the producer. It announces ``order.placed`` and knows nothing of who listens.

    python -m listeners.orders place --count 20
    python -m listeners.orders place --count 3 --region eu-north

Each order is written to the orders database (``ORDERS_DATABASE``, default
``var/orders.db``) together with its ``order.placed`` event, in one
transaction, through Pigeon's transactional outbox: an order is announced if
and only if it was stored. ``pigeon outbox relay sqlite:///var/orders.db``
(the ``orders-relay`` program of supervisord.conf) publishes the events.

Prints one line per order: order id, region, total, message id, once the
transaction committed.
"""

from __future__ import annotations

import os
import random
import uuid
from datetime import UTC, datetime
from pathlib import Path

import click
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, Text, create_engine, insert
from sqlalchemy.orm import Session

import pigeon
from listeners.events import LineItem, OrderPlaced
from pigeon.logs import configure_logging
from pigeon.outbox import Outbox

REGIONS = ("eu-west", "eu-central", "uk", "us-east")

CATALOGUE = (
    ("PGN-FEED-2KG", "Pigeon feed, 2 kg", 1290),
    ("PGN-LOFT-S", "Loft nesting box", 3450),
    ("PGN-RING-10", "Leg rings, pack of 10", 690),
    ("PGN-BATH", "Bath tray", 1890),
    ("PGN-GRIT-1KG", "Mineral grit, 1 kg", 540),
    ("PGN-BOOK", "Homing: a field guide", 2400),
)

CUSTOMERS = (
    ("Ada Lovelace", "ada@example.com"),
    ("Grace Hopper", "grace@example.org"),
    ("Alan Turing", "alan@example.net"),
    ("Katherine Johnson", "katherine@example.com"),
    ("Tim Berners-Lee", "tim@example.org"),
    ("Margaret Hamilton", "margaret@example.net"),
    ("Edsger Dijkstra", "edsger@example.com"),
    ("Barbara Liskov", "barbara@example.org"),
)


metadata = MetaData()
orders = Table(
    "orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("customer_email", String(255), nullable=False),
    Column("region", String(64), nullable=False),
    Column("total_cents", Integer, nullable=False),
    Column("placed_at", String(64), nullable=False),
    Column("document", Text, nullable=False),
)


def database() -> Engine:
    """The orders database; its file also holds the outbox (``pigeon_outbox``)."""
    path = Path(os.environ.get("ORDERS_DATABASE", "var/orders.db"))
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    return engine


def store(engine: Engine, outbox: Outbox, order: OrderPlaced) -> str:
    """Write the order and its ``order.placed`` in one transaction; returns the message id."""
    with Session(engine) as session, session.begin():
        session.execute(
            insert(orders).values(
                order_id=order.order_id,
                customer_email=order.customer_email,
                region=order.region,
                total_cents=order.total_cents,
                placed_at=order.placed_at.isoformat(),
                document=order.model_dump_json(),
            )
        )
        # A message id derived from the order id: should the relay publish it
        # twice (it died after the confirm, before marking the row), every
        # listener skips the second copy as a duplicate.
        return outbox.dispatch(
            session, order, message_id=f"{order.order_id}.placed", key=order.order_id
        )


def make_order(rng: random.Random, region: str | None = None) -> OrderPlaced:
    """A plausible order: one to three catalogue lines, for one of the known customers."""
    name, email = rng.choice(CUSTOMERS)
    items = [
        LineItem(sku=sku, name=title, quantity=rng.randint(1, 3), unit_price_cents=price)
        for sku, title, price in rng.sample(CATALOGUE, rng.randint(1, 3))
    ]
    return OrderPlaced(
        order_id=f"o-{uuid.uuid4().hex[:12]}",
        customer_email=email,
        customer_name=name,
        region=region or rng.choice(REGIONS),
        items=items,
        total_cents=sum(item.quantity * item.unit_price_cents for item in items),
        placed_at=datetime.now(UTC),
    )


@click.group()
def main() -> None:
    """The orders service of the order story."""


@main.command()
@click.option("--count", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--region", default=None, help=f"Ship every order here [random: {', '.join(REGIONS)}]."
)
@click.option("--seed", type=int, default=None, help="Make the generated orders reproducible.")
def place(count: int, region: str | None, seed: int | None) -> None:
    """Place COUNT orders: store each with its order.placed, for the relay to publish."""
    settings = pigeon.Settings()
    # pigeon logs through structlog; a command configures it once, to stderr,
    # so that stdout carries only the order lines.
    configure_logging(settings.log_format, settings.log_level)
    # The app stamps app_id=orders on every message (LetterThief shows it as
    # the event's service) and names the exchange the relay publishes to.
    engine = database()
    outbox = Outbox(engine, app=pigeon.Pigeon(service="orders", settings=settings))
    outbox.create_tables()
    rng = random.Random(seed)
    for _ in range(count):
        order = make_order(rng, region)
        message_id = store(engine, outbox, order)
        click.echo(f"{order.order_id} {order.region} {order.total_cents} {message_id}")
    engine.dispose()


if __name__ == "__main__":
    main()
