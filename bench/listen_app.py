"""The service ``bench.listen`` runs as ``pigeon listen bench.listen_app:app``, no flags.

Configured from ``PIGEON_*`` like any deployment; one listener that validates
the order and counts it with :class:`bench.orders.Meter`.
"""

from __future__ import annotations

from bench.orders import Item, Meter
from pigeon import Event, Pigeon
from pigeon.settings import Settings

EVENT = "bench.cli.order.placed"


class OrderPlaced(Event, name=EVENT):
    order_id: str
    customer_email: str
    items: list[Item]
    total_cents: int


def build(settings: Settings | None = None) -> Pigeon:
    """The app for ``settings`` (the environment's by default)."""
    settings = settings or Settings()
    app = Pigeon(settings.service or "bench-listen", settings=settings)
    meter = Meter()

    @app.listener(OrderPlaced)
    async def orders(order: OrderPlaced) -> None:
        meter.tick()

    return app


app = build()
