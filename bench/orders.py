"""What the command-line benchmark's consumers share: the order body and the meter.

Imported by every consumer subprocess (``pigeon listen``, FastStream, raw
aio-pika, pika), so it imports nothing but pydantic and the standard library.
"""

from __future__ import annotations

import json
import os
import time

from pydantic import BaseModel

COUNT_ENV = "BENCH_COUNT"
RESULT_ENV = "BENCH_RESULT"
QUEUE_ENV = "BENCH_QUEUE"


class Item(BaseModel):
    sku: str
    quantity: int
    price_cents: int


class Order(BaseModel):
    """An order placed: five items make a body of about 300 bytes."""

    order_id: str
    customer_email: str
    items: list[Item]
    total_cents: int


def order(i: int, items: int = 5) -> dict[str, object]:
    lines = [
        {"sku": f"SKU-{(i + n) % 10_000:05d}", "quantity": 1 + n % 3, "price_cents": 1299 + n}
        for n in range(items)
    ]
    total = sum(int(str(line["quantity"])) * int(str(line["price_cents"])) for line in lines)
    return {
        "order_id": f"o-{i:08d}",
        "customer_email": "customer@example.com",
        "items": lines,
        "total_cents": total,
    }


def encode(data: dict[str, object]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def items_for(size: int) -> int:
    """How many items fit in an order body of about ``size`` bytes (at least 5)."""
    items = 5
    while len(encode(order(0, items + 1))) <= size:
        items += 1
    return items


def body(i: int, size: int) -> bytes:
    """The JSON of order ``i``, about ``size`` bytes (5 items: about 350)."""
    return encode(order(i, items_for(size)))


class Meter:
    """Counts handled messages; after the ``BENCH_COUNT``-th it writes the rate and the
    process's CPU time per message (all threads) since the first to ``BENCH_RESULT``.

    The clock starts at the first message, so start-up is not counted."""

    def __init__(self) -> None:
        self.count = int(os.environ.get(COUNT_ENV, "0"))
        self.result = os.environ.get(RESULT_ENV, "")
        self.seen = 0
        self.wall = 0.0
        self.cpu = 0.0

    def tick(self) -> None:
        self.seen += 1
        if self.seen == 1:
            self.wall, self.cpu = time.perf_counter(), time.process_time()
        elif self.seen == self.count and self.result:
            wall = time.perf_counter() - self.wall
            cpu = time.process_time() - self.cpu
            n = self.count - 1  # the interval holds every message after the first
            report = {"rate": n / wall, "cpu_us": cpu / n * 1e6}
            partial = f"{self.result}.partial"
            with open(partial, "w", encoding="utf-8") as f:
                json.dump(report, f)
            os.replace(partial, self.result)
