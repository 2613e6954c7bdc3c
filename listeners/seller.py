"""Seller: reserves the goods of each order and announces ``shipment.ready``.

    pigeon listen listeners.seller:app

Shipments live in a SQLite table (``SELLER_DATABASE``, default ``var/seller.db``).
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

from listeners.events import OrderPlaced, ShipmentReady
from pigeon import Context, Pigeon

app = Pigeon(service=os.environ.get("PIGEON_SERVICE") or "seller")

DATABASE = Path(os.environ.get("SELLER_DATABASE", "var/seller.db"))
WAREHOUSES = {"eu-west": "Lyon", "eu-central": "Leipzig", "uk": "Daventry", "us-east": "Newark"}
ITEMS_PER_PARCEL = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS shipments (
    order_id    TEXT PRIMARY KEY,
    shipment_id TEXT NOT NULL,
    warehouse   TEXT NOT NULL,
    parcels     INTEGER NOT NULL,
    message_id  TEXT NOT NULL,
    reserved_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
)
"""


class Shipment(NamedTuple):
    shipment_id: str
    warehouse: str
    parcels: int


@app.listener(OrderPlaced)
async def reserve_shipment(event: OrderPlaced, ctx: Context) -> None:
    # sqlite3 blocks: run it in a thread so the event loop keeps serving other messages.
    shipment = await asyncio.to_thread(reserve, event, ctx.message_id)
    # ctx.dispatch keeps the correlation id and records this message as the cause,
    # so LetterThief and the logs can follow one order across every service. The
    # message id is derived from ours: should this handler run again (a crash
    # before pigeon noted it as done), the second shipment.ready has the same id
    # and its listeners skip it as a duplicate.
    await ctx.dispatch(
        ShipmentReady(
            order_id=event.order_id,
            shipment_id=shipment.shipment_id,
            warehouse=shipment.warehouse,
            region=event.region,
            parcels=shipment.parcels,
        ),
        message_id=f"{ctx.message_id}.shipment-ready",
    )


def reserve(event: OrderPlaced, message_id: str) -> Shipment:
    """Reserve the order's shipment, or return the one reserved before.

    Pigeon already runs a handler once per message id; this closes the last
    gap (a crash after the commit, before pigeon recorded the message as
    done; see docs/delivery-guarantees.md). The order id is the table's key,
    and the INSERT OR IGNORE and the SELECT share one transaction: a
    redelivery, a duplicate order.placed or a LetterThief replay all find
    the same row instead of reserving the goods twice.
    """
    DATABASE.parent.mkdir(parents=True, exist_ok=True)
    items = sum(item.quantity for item in event.items)
    with closing(sqlite3.connect(DATABASE, timeout=30)) as db, db:  # `with db`: one transaction
        db.execute(SCHEMA)
        db.execute(
            "INSERT OR IGNORE INTO shipments (order_id, shipment_id, warehouse, parcels, message_id)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                event.order_id,
                f"s-{uuid.uuid4().hex[:12]}",
                WAREHOUSES.get(event.region, "Leipzig"),
                max(1, math.ceil(items / ITEMS_PER_PARCEL)),
                message_id,
            ),
        )
        row = db.execute(
            "SELECT shipment_id, warehouse, parcels FROM shipments WHERE order_id = ?",
            (event.order_id,),
        ).fetchone()
    return Shipment(*row)
