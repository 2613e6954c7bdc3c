"""``python -m bench``: every benchmark in one run, one table, and ``docs/performance.md``."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import cluster, consume, dispatch, latency, letterthief, listen, memory, outbox
from bench.common import quiet_logs, table

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"

INTRO = """\
# Performance

What `make bench` measured for issues #7 ("Fast and frugal") and #19 ("Fast
by default"). This file is written by `python -m bench`; edit
`bench/__main__.py`, not this file.

The machine has 2 cores, shared with the RabbitMQ broker and with whatever
else runs there, so absolute figures move from run to run. Each throughput
and latency figure is therefore set against a peer (raw aio-pika, FastStream)
measured in the same run, on the same broker, a moment apart: the ratio is
the figure to read. Every contender uses quorum queues, persistent messages
and, when it publishes, publisher confirms.

The third column is the peer's figure or the target; the fourth is
pigeon ÷ peer (for throughput higher is better, for latency lower is better)
or whether the target was met.

- **pigeon listen, as users run it**: each contender is a process of its
  own, started as its documentation says, draining 20,000 events (5,000 of
  16 KiB) pre-published to its own quorum queue, from its first message to
  its last: `pigeon listen bench.listen_app:app` with **no flags** (SQLite
  store by default, in an empty directory; JSON log line per message at
  INFO), FastStream's default subscriber (no prefetch limit, its default
  logger, pydantic validation), raw aio-pika at prefetch 100 (`json.loads`,
  an ack per message). The body is an order of 5 items (355 bytes), then
  1 KiB and 16 KiB orders (more items); Pigeon also with the Redis and
  PostgreSQL stores. Two rounds, each contender once per round in turn; the
  fastest rate and the lowest CPU per message of each contender's two runs
  (the least disturbed by the neighbours). Besides the rate, each process's
  CPU time per message (all its threads), the steadier figure.
- **broker ceiling**: what the broker does on this machine with no client
  work at all: pika consuming with auto-ack (nothing decoded, nothing acked)
  and pika publishing without confirms. Every Pigeon rate is also given as a
  fraction of it: the physical limit, not a target.
- **dispatch**: events published and confirmed per second into a quorum
  queue, one at a time (sequential), 256 in flight, and through
  `dispatch_many`.
- **consume**: events per second a worker drains from a pre-filled quorum
  queue, in this process, acking each after its handler returns (all at
  prefetch 64, Pigeon with concurrency 64), per
  idempotency store (SQLite is the default) and with idempotency off; and
  the consuming process's CPU time per message (all its threads), which
  moves far less with the neighbours than the rate does (lower is better).
- **latency**: milliseconds from `dispatch_async` to the start of the handler
  at a steady 500 events/s, p50 and p99, worker with default settings
  (SQLite idempotency, concurrency 10, prefetch 100), against a plain
  aio-pika consumer. Target: p99 ≤ 10 ms.
- **targets** (issue #19), each a ratio measured in this run: default
  `pigeon listen` ≥ 1.2x FastStream's default and ≥ 0.8x raw aio-pika;
  dispatch sequential ≥ 1.0x, 256 in flight ≥ 1.5x and `dispatch_many`
  ≥ 1.9x raw aio-pika.
- **listener RSS growth**: how much a `pigeon listen` process grows between
  20,000 and 200,000 handled events (default settings, SQLite idempotency);
  target ≤ 10 MiB. It must also exit 0 on SIGTERM.
- **letterthief collector ingest**: dead letters per second from LetterThief's
  start until 20,000 waiting ones are stored (SQLite); target ≥ 2,000/s.
- **letterthief list**: p95 of the server's time (the ASGI call, no network)
  over 200 requests with 100,000 letters stored (SQLite, login configured);
  target ≤ 200 ms.
- **outbox** (PostgreSQL): events per second through `outbox.dispatch_async`
  (one event per transaction, 256 transactions in flight) and an in-process
  relay, to the last confirm, against plain `dispatch_async` with 256 in flight
  (target ≥ 0.5x); the relay alone draining a pre-filled table; the outbox
  against the same 256 transactions in flight without it, and those
  transactions against plain dispatch (the ceiling of any
  one-event-per-transaction outbox in this process); the process's CPU time
  per event, and the load average. Each round measures every figure once, in
  turn; see docs/outbox.md for what the figures showed.
"""

REPRODUCE = """\
## How to reproduce

<!-- skip: next -->
```sh
make bench                      # every benchmark; rewrites this file
.venv/bin/python -m bench.dispatch
.venv/bin/python -m bench.listen [COUNT]   # the pigeon listen subprocess rows
.venv/bin/python -m bench.consume
.venv/bin/python -m bench.latency
.venv/bin/python -m bench.memory
.venv/bin/python -m bench.letterthief
.venv/bin/python -m bench.outbox
.venv/bin/python -m bench.cluster  # on `make cluster`; rewrites only its own section
```

Each module prints its rows without touching this file. The broker is
`PIGEON_BENCH_URL` (default `amqp://guest:guest@127.0.0.1:5672/`); the consume
rows for Redis and PostgreSQL expect them on 127.0.0.1:6379 and :5432. Each
benchmark works on its own uniquely named (`bench…`) exchanges and queues,
and deletes them afterwards; `bench.listen` runs the PostgreSQL store in a
database of its own (dropped afterwards) and deletes its Redis keys.
"""

FINDINGS = """\
## What the profile showed (issue #19: fast by default)

Measured on the same 2-core machine while six other sessions ran their test
suites on it (load average 2 to 10 during this work), so every decision was
an interleaved A/B: old and new code alternating, several short runs each
(10,000 to 15,000 events), medians compared, CPU per message as the steadier
figure.

- With `--concurrency 10` and prefetch = concurrency (the old defaults),
  `pigeon listen` used a little over half a core: it waited, it did not
  compute. The SQLite group commit and the ack batching only pay off with
  many messages in flight, and the worker held the concurrency semaphore
  around everything: decoding, the claim, the handler and the done mark.
  At most ten claims could share a commit, and each message waited for two
  commits in a row while holding a handler slot. The same binary at
  `--concurrency 64` ran about twice as fast (6,800/s against 3,300/s) and
  cost a third less CPU per message (118 µs against 177 µs): bigger commits
  and longer `multiple` acks.
- So `--concurrency` now bounds the handler only (middleware and handler),
  and decoding, the claim and the done mark run outside it. A prefetched
  message waiting for a slot is already validated and claimed, in the same
  commit as the others. Interleaved, defaults otherwise unchanged and
  prefetch 40: 3,350/s → 5,600/s, 187 µs → 129 µs per message.
- Prefetch: 10x concurrency (100 with the defaults) against 4x, five
  interleaved pairs: faster in five of five (median 6,260/s against
  5,470/s) and cheaper in five of five (112 µs against 131 µs per message).
  200 was a little faster again (107 µs), but holds twice as many messages
  in one process after a crash; 10x keeps the prefetch proportional to what
  a process can run, so a listener run with `--concurrency 1` for slow jobs
  holds ten. What it costs: a crash returns up to `--prefetch` messages, and
  the ones the dead process had claimed wait for their lease (30 s) before
  another process runs them; idempotency absorbs the duplicates
  (`docs/delivery-guarantees.md`). A graceful stop starts none of the
  waiting messages: their claims are released and they are handed back at
  once (the SIGTERM test caught this: with the first change alone, the drain
  ran every prefetched message).
- The PostgreSQL store sent every loop turn's claims as a statement at once,
  so with 100 messages in flight it ran many small statements side by side,
  queueing for the pool and committing one by one. It now keeps at most two
  statements in flight and sends what arrived meanwhile with the next, a
  group commit like SQLite's: interleaved, median 2,800/s → 5,000/s and
  115 µs → 104 µs per message.
- What is left of a default listener's main thread (py-spy, 300 Hz, SQLite,
  prefetch 100): reading frames in aiormq and pamqp about a fifth, the
  per-message JSON log line (structlog, one `write()` each) about a sixth,
  the store round (claim, done mark, hand-off to its thread) about a sixth,
  pydantic validation about 4%, the claim's lease timer 2 to 3%, the
  metrics and tracing middleware about 5%. Buffering the log lines to one
  write per loop turn would save about a third of the log's share, at the
  price of lines lost with a killed process; not done. FastStream's default
  writes two log lines per message, and its CPU per message is about twice
  Pigeon's.
- Latency at 500/s does not depend on prefetch (the queue is nearly empty):
  old and new code alternating, in the calmer pair, p50 1.4 ms against
  1.3 ms and p99 33.9 ms against 32.3 ms. The p99 target (10 ms) was met in
  quiet runs of issue #7 and is missed whenever the shared disk is busy (the
  SQLite checkpoint's fsync, see below); raw aio-pika's own p99 then reached
  13 to 990 ms in this session's runs. Sequential dispatch waits for each
  confirm, so it moves with the broker's round trip: 0.63x to 1.03x raw
  aio-pika across this session's runs, neither code path changed here.

## What the profile showed (issue #7: fast and frugal)

- Building aio-pika's `IncomingMessage` for every delivery was the largest
  pigeon-attributable cost of consuming, so the worker consumes through
  aiormq directly and reads the frame it already has.
- SQLite idempotency cost two transactions per message (claim, then done).
  Group commit runs whatever is pending in one transaction and answers each
  caller only after that commit; it doubled default consume throughput.
- After that, acking was about 18% of the consuming thread (py-spy): one
  `basic.ack` per message, each with its own frame, drain future, timeout and
  socket write. Acks are now written once per event-loop turn, a run of
  finished messages as one `multiple` ack (never over a message still in
  progress; see `docs/delivery-guarantees.md`). With idempotency off the
  worker now costs about what raw aio-pika does per message; with SQLite, ack
  writes fell from one per message to about one per forty.
- What SQLite adds over the memory store, 40 to 80 µs of CPU per message,
  is its statements, not the thread they run on: a store with the same
  thread and group commit but no SQL consumed like the memory store (75 to
  98 µs per message against 62 to 81, real SQLite 107 to 148, interleaved).
  Measured alone, a claim costs about 20 µs and a done mark 10 to 15 µs,
  with its share of the commit: message ids are random, so every claim
  dirties a different B-tree page, which the commit appends to the WAL and
  a checkpoint later copies back. Tried and dropped, no gain beyond the
  noise: running SQLite on the loop's thread; one JSON batch statement per
  transaction; `executemany` for a batch's claims with one `SELECT` for the
  tokens, or `rowcount` instead of `RETURNING` (claims within 2 µs of each
  other); an `UPDATE` instead of an upsert for done marks; 1 KiB pages; a
  larger page cache or `mmap`; a longer GIL switch interval; prefetch above
  concurrency; handing one loop turn's calls to the store's thread in one
  queue put instead of under a lock. Dropping the `expires_at` index made no
  consistent difference to the statements and would turn the periodic purge
  into a full scan under the write lock; it stays.
- After acks and the store, the largest cost of a delivery was aiormq's
  own: each of its three frames (method, header, body) went through a queue
  to the channel's reader task, a wake-up each, and then a task per message
  existed only to call the consumer, which spawned the worker's task. The
  worker now takes a consumer channel's frames as the connection reads them
  (`pigeon.amqp.frames.Deliveries`) and spawns its task when a message's last
  frame arrived; other frames still go to aiormq in order. That took about
  40 µs of CPU off every consumed message, whatever the store.
- Publishing through aiormq's `basic_publish` cost, per message, a wait on
  the channel lock, a generic pamqp marshal of three frames (about a fifth
  of the CPU), a slot in the connection's ten-slot write queue (full most of
  the time with 256 publishes in flight, so publishers queued on the lock)
  and a `send()` system call of its own (another tenth). Pigeon now
  encodes a publish itself (`pigeon.amqp.frames`: the method frame cached per
  exchange and routing key, the properties the wire format fixes), takes
  the delivery tag at once and writes everything published in one loop
  turn as one payload (`pigeon.amqp.publishes`); the confirmations stay
  aiormq's own futures. The tests hold the bytes equal to pamqp's.
  `dispatch_many` went from about 80 to about 40 µs of CPU per event
  (measured in the same run: about 10,500/s to 14,000 to 19,000/s), from
  about 1.2x to about 2x raw aio-pika with 256 in flight; 256 concurrent
  dispatches from 0.84 to 0.99x to about 1.2 to 1.3x. Sequential dispatch
  waits for each confirm, so the broker's round trip sets it: about 1x.
- `dispatch_many` keeps the confirms of a whole chunk (1,000 events) in
  flight, and two chunks at once, so the link does not idle while the broker
  confirms the end of one (about 5% over one chunk at a time, measured
  interleaved). Its CPU is no longer the limit: the broker is (the process
  is busy about 70% of the time), so its ratio to 256 in flight moves with
  how close aio-pika gets to the broker's confirmed throughput into a
  quorum queue.
- A JSON log line costs about 20 µs per message at INFO. It stays: it is the
  audit trail. `PIGEON_LOG_LEVEL=WARNING` drops it.
- The Redis store spent most of its time in redis-py's per-command
  machinery (a pooled connection, a send and a read per call). It now sends
  whatever one loop turn asked for as one pipeline: consume went from about
  1,900/s to 2,700/s here and its CPU per message from about 530 µs to
  360 µs. The PostgreSQL store likewise sends one loop turn's claims as one
  statement over arrays (`unnest`), and its done marks as another: one
  round trip and one commit for dozens of messages. It went from about
  1,700/s to 2,400 to 2,900/s, and from about 450 µs to 270 to 340 µs of CPU
  per message. With the frame-level delivery path both ran at 0.6 to
  0.9x raw aio-pika across this session's runs.
- A full garbage-collector pass over a listener's heap (about 46,000
  objects after start-up) takes about 12 ms, longer than the whole p99
  budget. `pigeon listen` now freezes the start-up heap (`gc.freeze()`), so
  full passes only walk what the listener allocated since; in a quiet run
  the memory-store p99 then came within 0.5 ms of raw aio-pika's (4.0 ms
  against 3.5 ms).
- At a steady 500 events/s the SQLite store's latency tail comes from WAL
  checkpoints: every 1,000 WAL pages SQLite copies the WAL into the database
  file and fsyncs it, and that fsync competes for the disk with RabbitMQ,
  which shares it here, so deliveries pause meanwhile. Moving the checkpoint
  to a background thread (passive, once a second) kept the store's own calls
  fast but made the end-to-end p99 worse (~27 ms against ~11 ms), and a
  larger `wal_autocheckpoint` (10,000 pages) made it 3 to 8 times worse, so
  SQLite's automatic checkpoint stays at its default. Skipping the fsync
  (`synchronous=OFF`) would put the file at risk on power loss. When a tight
  tail matters, use the Redis or PostgreSQL store, or put the SQLite file on
  another disk than the broker's. On this VM the disk is shared with other tenants: in quiet
  runs the SQLite p99 was 6.7 to 10 ms, in a disturbed one 80 ms while raw
  aio-pika's rose to 15 ms.
"""


def document(
    rows: list[tuple[str, str, str, str]],
    when: datetime,
    minutes: float,
    load: tuple[float, float],
) -> str:
    return (
        f"{INTRO}\n"
        f"## Figures\n\n"
        f"Run of {when:%Y-%m-%d %H:%M} UTC ({minutes:.0f} min), load average "
        f"{load[0]:.1f} at its start and {load[1]:.1f} at its end (2 cores).\n\n"
        f"{table(rows)}\n\n"
        f"{REPRODUCE}\n"
        f"{FINDINGS}"
    )


Row = tuple[str, str, str, str]

TARGETS = (
    ("pigeon listen (sqlite), order (5 items, 355 B) vs faststream default", 1.2),
    ("pigeon listen (sqlite), order (5 items, 355 B) vs aio-pika prefetch 100", 0.8),
    ("dispatch sequential vs aio-pika", 1.0),
    ("dispatch 256 in flight vs aio-pika", 1.5),
    ("dispatch_many vs aio-pika 256 in flight", 1.9),
)


def rate(cell: str) -> float:
    return float(cell.removesuffix("/s").replace(",", ""))


def of_ceiling(rows: list[Row], published: float) -> list[Row]:
    """Each dispatch figure (once per contender set) against the broker's unconfirmed
    publish rate: the physical limit of the broker on this machine."""
    seen: dict[str, Row] = {}
    for figure, mine, _, _ in rows:
        label = figure.partition(" vs ")[0]
        if label.startswith("dispatch") and label not in seen:
            fraction = f"{rate(mine) / published:.2f}x"
            seen[label] = (f"{label} vs broker ceiling", mine, f"{published:,.0f}/s", fraction)
    return list(seen.values())


def targets(rows: list[Row]) -> list[Row]:
    """The issue's targets, each a ratio measured in this run."""
    ratios = {figure: ratio for figure, _, _, ratio in rows}
    out = []
    for figure, least in TARGETS:
        ratio = ratios.get(figure)
        if ratio is not None:
            met = float(ratio.removesuffix("x")) >= least
            out.append((f"target: {figure}", ratio, f"≥ {least}x", "met" if met else "missed"))
    return out


async def run_all() -> None:
    quiet_logs()
    started = time.monotonic()
    when = datetime.now(UTC)
    load_start = os.getloadavg()[0]
    rows = await dispatch.main()
    cli_rows, published = await listen.run()
    rows += of_ceiling(rows, published)
    rows += cli_rows
    rows += await consume.main()
    rows += await latency.main()
    rows += await memory.main()
    rows += await letterthief.main()
    rows += await outbox.main()
    rows += targets(rows)
    print(table(rows))
    minutes = (time.monotonic() - started) / 60
    load = (load_start, os.getloadavg()[0])
    text = document(rows, when, minutes, load)
    kept = cluster.kept_section(DOC.read_text(encoding="utf-8")) if DOC.exists() else ""
    DOC.write_text(cluster.with_section(text, kept) if kept else text, encoding="utf-8")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    asyncio.run(run_all())
