"""Orders: the producer. It announces ``order.placed`` and knows nothing of who listens.

    python -m listeners.orders place --count 20
    python -m listeners.orders place --count 3 --region eu-north

Prints one line per order: order id, region, total, message id. Each line is
printed only after RabbitMQ confirmed the message, so a printed order is a
stored order.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

import click

import pigeon
from listeners.events import LineItem, OrderPlaced
from pigeon.logs import configure_logging

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
    """Place COUNT orders: dispatch one order.placed per order."""
    settings = pigeon.Settings()
    # pigeon logs through structlog; a command configures it once, to stderr,
    # so that stdout carries only the order lines.
    configure_logging(settings.log_format, settings.log_level)
    # pigeon.dispatch() uses the default app; naming it stamps app_id=orders on
    # every message, which LetterThief shows as the event's service.
    pigeon.set_default_app(pigeon.Pigeon(service="orders", settings=settings))
    rng = random.Random(seed)
    for _ in range(count):
        order = make_order(rng, region)
        # A message id derived from the order id: if this process dies after the
        # dispatch but before it notes the order as announced, announcing it
        # again sends the same id, and every listener skips it as a duplicate.
        message_id = pigeon.dispatch(order, message_id=f"{order.order_id}.placed")
        click.echo(f"{order.order_id} {order.region} {order.total_cents} {message_id}")


if __name__ == "__main__":
    main()
