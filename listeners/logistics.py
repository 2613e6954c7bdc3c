"""Logistics: books a delivery partner for each order and announces ``delivery.assigned``.

    pigeon listen listeners.logistics:app
    python -m listeners.logistics partners                       # who delivers where
    python -m listeners.logistics add-partner eu-north PostNord  # then Try again in LetterThief

The story's failure path lives here. An order for a region that no partner
serves raises :class:`NoPartnerForRegion`; it is tried three times (again
after 1 s, then after 2 s) and then waits in LetterThief with its traceback.
Add the partner and press Try again: LetterThief sends the message back to
this service's queue only, and the order completes.

Partners are read from ``LOGISTICS_PARTNERS_FILE`` (default
``var/partners.json``, falling back to ``listeners/partners.json``) on every
message, so a fix needs no restart. ``LOGISTICS_BOOKING_DELAY`` (seconds)
plays a slow partner API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import click

from listeners.events import DeliveryAssigned, OrderPlaced, ShipmentReady
from pigeon import Context, Pigeon, Retry

app = Pigeon(service=os.environ.get("PIGEON_SERVICE") or "logistics")

DEFAULT_PARTNERS = Path(__file__).with_name("partners.json")
PARTNERS_FILE = Path(os.environ.get("LOGISTICS_PARTNERS_FILE", "var/partners.json"))
BOOKING_DELAY = float(os.environ.get("LOGISTICS_BOOKING_DELAY", "0"))


class NoPartnerForRegion(Exception):
    """No delivery partner serves the order's region (yet)."""


# A short retry policy so the demo's failure path plays out in seconds. The
# default (5 attempts, 1 s, 10 s, 60 s, 300 s apart) rides out longer outages.
@app.listener(OrderPlaced, retry=Retry(attempts=3, delays=[1, 2]))
async def assign_partner(event: OrderPlaced, ctx: Context) -> None:
    partner = load_partners().get(event.region)
    if partner is None:
        # The message is what a person reads in LetterThief: say what to do.
        raise NoPartnerForRegion(
            f"no delivery partner serves region {event.region!r}; add one "
            f"(python -m listeners.logistics add-partner {event.region} NAME) "
            "and press Try again"
        )
    ctx.log.info("partner.booking", order_id=event.order_id, partner=partner)
    if BOOKING_DELAY:
        await asyncio.sleep(BOOKING_DELAY)
    code = tracking_code(partner, event.order_id)
    await ctx.dispatch(
        DeliveryAssigned(
            order_id=event.order_id,
            customer_email=event.customer_email,
            customer_name=event.customer_name,
            region=event.region,
            partner=partner,
            tracking_code=code,
            tracking_url=f"https://track.shop.example/{code}",
        ),
        message_id=f"{ctx.message_id}.delivery-assigned",
    )


@app.listener(ShipmentReady)
async def schedule_pickup(event: ShipmentReady, ctx: Context) -> None:
    # A real service would book the partner's van at the warehouse here.
    ctx.log.info(
        "pickup.scheduled",
        order_id=event.order_id,
        warehouse=event.warehouse,
        parcels=event.parcels,
    )


def load_partners() -> dict[str, str]:
    """Region → partner name, read afresh on every call."""
    path = PARTNERS_FILE if PARTNERS_FILE.exists() else DEFAULT_PARTNERS
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of region to partner name")
    return {str(region): str(name) for region, name in data.items()}


def tracking_code(partner: str, order_id: str) -> str:
    """The same code for the same order, so a replayed booking tells the same story."""
    initials = "".join(word[0] for word in partner.split()).upper()
    return initials + hashlib.sha256(order_id.encode()).hexdigest()[:10].upper()


@click.group()
def main() -> None:
    """Manage the delivery partners of the logistics service."""


@main.command()
def partners() -> None:
    """Print who delivers where."""
    for region, name in sorted(load_partners().items()):
        click.echo(f"{region:<12} {name}")


@main.command("add-partner")
@click.argument("region")
@click.argument("name")
def add_partner(region: str, name: str) -> None:
    """Let NAME deliver to REGION (takes effect with the next message)."""
    table = load_partners()
    table[region] = name
    PARTNERS_FILE.parent.mkdir(parents=True, exist_ok=True)
    partial = PARTNERS_FILE.with_name(f".{PARTNERS_FILE.name}.partial")
    partial.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, PARTNERS_FILE)  # listeners never read half a file
    click.echo(f"{name} now delivers to {region} ({PARTNERS_FILE})")


if __name__ == "__main__":
    main()
