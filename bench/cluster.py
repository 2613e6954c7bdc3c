"""Dispatch and consume on the three-node cluster against raw aio-pika on the same cluster.

``python -m bench.cluster`` starts the cluster of ``scripts/cluster.sh`` if it
is not running (and stops it after), runs the dispatch and consume
benchmarks of :mod:`bench.dispatch` and :mod:`bench.consume` against it in
one run, prints the rows and rewrites the cluster section of
``docs/performance.md`` (``make bench`` keeps that section).

Every contender talks to the same node (the first of
``PIGEON_BENCH_CLUSTER_URL``), where the quorum queues are declared and so
led; each queue has three members, so every message is replicated to the
two other nodes before it is confirmed. Pigeon gets the whole node list, as
a deployment would, without shuffling, so it uses the same node as the peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench import common, consume, dispatch
from bench.common import quiet_logs, table
from pigeon.settings import Settings, broker_urls

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
CLUSTER_SCRIPT = ROOT / "scripts" / "cluster.sh"
CLUSTER_URL = os.environ.get(
    "PIGEON_BENCH_CLUSTER_URL",
    ",".join(f"amqp://guest:guest@127.0.0.1:{port}/" for port in (5701, 5702, 5703)),
)
HEADING = "## On a three-node cluster"

Row = tuple[str, str, str, str]


def cluster_settings(prefix: str) -> Settings:
    """The benchmark settings, with the cluster's node list (first node first)."""
    return common.bench_settings(prefix).model_copy(
        update={"url": CLUSTER_URL, "url_shuffle": False}
    )


@contextlib.contextmanager
def on_cluster() -> Iterator[None]:
    """Point the dispatch and consume benchmarks at the cluster, and back after."""
    first = broker_urls(CLUSTER_URL)[0]
    saved: list[tuple[Any, str, Any]] = []
    for module in (dispatch, consume):
        for name, value in (("URL", first), ("bench_settings", cluster_settings)):
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def cluster_is_up() -> bool:
    done = subprocess.run(
        [str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, check=False
    )
    return done.stdout.count(" up") == 3


async def consume_rows(count: int, rounds: int, tmp: str) -> list[Row]:
    prefix = common.new_prefix()
    settings = cluster_settings(prefix)
    raw = await consume.best_of(rounds, lambda: consume.raw_rate(prefix, count))
    rows: list[Row] = []
    for label, store_url, idempotent in (
        ("sqlite (default)", f"sqlite:///{tmp}/idem.db", True),
        ("memory", "memory://", True),
        ("off", "memory://", False),
    ):
        run = partial(
            consume.pigeon_rate, settings, count, idempotent=idempotent, store_url=store_url
        )
        mine = await consume.best_of(rounds, run)
        name = f"idempotency {label}" if idempotent else "idempotency off"
        rows += consume.compare(name, mine, "aio-pika", raw)
    return rows


async def main(count: int = 10_000, rounds: int = 2) -> list[Row]:
    with on_cluster(), tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
        rows = [
            row
            for row in await dispatch.main(sequential=1000, concurrent=5000, rounds=rounds)
            if "faststream" not in row[0]
        ]
        rows += await consume_rows(count, rounds, tmp)
    return rows


def single_node_ratios(doc: str) -> dict[str, str]:
    """The ratios of the single-node run in ``doc`` (its first table), by figure."""
    ratios = {}
    for line in doc.split(HEADING)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[\d.]+x", cells[3]):
            ratios[cells[0]] = cells[3]
    return ratios


def section(rows: list[Row], single: dict[str, str], when: datetime, minutes: float) -> str:
    header = "| figure | pigeon | aio-pika | ratio | single node |\n|---|---|---|---|---|\n"
    body = "".join(f"| {' | '.join(row)} | {single.get(row[0], '')} |\n" for row in rows)
    load = os.getloadavg()[0]
    return (
        f"{HEADING}\n\n"
        "What `python -m bench.cluster` measured on `make cluster` (three RabbitMQ nodes on\n"
        "this one machine, quorum queues with three members) against raw aio-pika on the same\n"
        "node of the same cluster, in one run. The last column is the ratio of the single-node\n"
        "run above: the target. Three nodes on two cores, next to the machine's own broker and\n"
        "other work, make the absolute figures lower and noisier than on one node; the ratio is\n"
        "the figure to read.\n\n"
        f"Run of {when:%Y-%m-%d} ({minutes:.0f} min; load average {load:.1f} on "
        f"{os.cpu_count()} cores at its end).\n\n"
        f"{header}{body}\n"
        "On a cluster every publish and every ack is a Raft command that a majority of the\n"
        "queue's members must store. Pigeon writes the publishes of one event-loop turn as one\n"
        "payload and acks a run of finished messages with one `multiple` ack, so the broker\n"
        "commits them in fewer, larger rounds; raw aio-pika publishes and acks one message at a\n"
        "time, each its own command. That is why the ratios are well above the single-node\n"
        "ones, and why they move a lot with the load of the machine.\n"
    )


def with_section(doc: str, text: str) -> str:
    """``doc`` with its cluster section replaced by ``text`` (appended if it had none)."""
    before = doc.split(HEADING)[0].rstrip("\n")
    return f"{before}\n\n{text}"


def kept_section(doc: str) -> str:
    """The cluster section of ``doc`` ("" if none), for ``make bench`` to keep."""
    return doc[doc.index(HEADING) :] if HEADING in doc else ""


def run() -> None:
    quiet_logs()
    started_cluster = not cluster_is_up()
    if started_cluster:
        subprocess.run([str(CLUSTER_SCRIPT), "start"], check=True)
    started = time.monotonic()
    try:
        rows = asyncio.run(main())
    finally:
        if started_cluster:
            subprocess.run([str(CLUSTER_SCRIPT), "stop"], check=True)
    print(table(rows))
    doc = DOC.read_text(encoding="utf-8")
    text = section(
        rows, single_node_ratios(doc), datetime.now(UTC), (time.monotonic() - started) / 60
    )
    DOC.write_text(with_section(doc, text), encoding="utf-8")
    print(f"wrote the cluster section of {DOC}")


if __name__ == "__main__":
    run()
