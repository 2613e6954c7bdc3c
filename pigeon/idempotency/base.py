"""The contract every idempotency store keeps.

A listener handles each message id once. Before the handler runs, the worker
claims ``"{queue}:{message_id}"`` with a lease; after success it marks the key
done; on failure it releases the claim so a retry or a later replay can run
the handler again. A done key stays done for ``retention`` seconds, then it is
forgotten (purged), so the store stays bounded.

A claim whose lease ran out (the process holding it died) counts as absent:
the next claimer gets it. A claim's token names its owner, so a process on
the same host can see that the holder died and free its claim at once.
After a failure, the outcome (retried, dead-lettered) is recorded under the
key too, so a redelivery of a message whose outcome was already published
is not run again. A done row past its retention counts as absent too,
even before :meth:`IdempotencyStore.purge` deletes it.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import os
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from pigeon.errors import ConfigurationError
from pigeon.idempotency.owner import owner

T = TypeVar("T")

OUTCOME_SUFFIX = "\x1foutcome"
"""Appended to a key for the row or entry that records its outcome."""


class ClaimState(enum.Enum):
    """What :meth:`IdempotencyStore.claim` found."""

    CLAIMED = "claimed"
    """The caller holds the key now and must call ``done`` or ``release``."""
    DONE = "done"
    """The message was handled already: ack it without running the handler."""
    IN_PROGRESS = "in-progress"
    """Another worker holds an unexpired lease: try again after ``retry_after``."""


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to a claim.

    ``token`` is set only when ``state`` is ``CLAIMED``; pass it to ``done`` or
    ``release``. ``retry_after`` is the seconds left on another holder's lease
    when ``state`` is ``IN_PROGRESS``, else ``0.0``; ``holder`` is that
    holder's token (passing it to ``release`` frees a dead holder's claim).
    """

    state: ClaimState
    token: str | None = None
    retry_after: float = 0.0
    holder: str | None = None
    """When ``IN_PROGRESS``: the holder's token, which names its owner (see
    :mod:`pigeon.idempotency.owner`); ``None`` if the store could not tell."""


async def answer_each(
    futures: Sequence[asyncio.Future[Any]], work: Awaitable[Sequence[Any]]
) -> None:
    """Await ``work``, a batch's answers in the order of ``futures``, and hand them out.

    For the stores that batch one loop turn's calls into one round trip: an
    answer that is an exception is raised to its caller alone; ``work``
    failing fails every caller (the store is unreachable: each message fails
    this try); cancelling it cancels them. A future already done, whose
    caller was cancelled, is skipped.
    """
    try:
        answers = await work
    except Exception as exc:
        for future in futures:
            if not future.done():
                future.set_exception(exc)
        return
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    for future, result in zip(futures, answers, strict=True):
        if future.done():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


class Batches(Generic[T]):
    """The calls of one event-loop turn, grouped by kind, each group sent as one round trip.

    The Redis store sends one pipeline per turn, the PostgreSQL store one
    statement per kind (claims of one lease, done marks): both through this
    one loop. ``send(kind, items)`` returns the answers in the order of
    ``items``; :func:`answer_each` hands them to the callers.
    """

    __slots__ = ("_groups", "_max_sending", "_send", "_sending")

    def __init__(
        self,
        send: Callable[[Hashable, list[T]], Awaitable[Sequence[Any]]],
        *,
        max_sending: int | None = None,
    ) -> None:
        self._send = send
        self._max_sending = max_sending
        self._groups: dict[Hashable, tuple[list[T], list[asyncio.Future[Any]]]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    def add(self, kind: Hashable, item: T) -> asyncio.Future[Any]:
        """Add ``item`` to this turn's batch of ``kind``; the future is its answer."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._groups:
            loop.call_soon(self.flush)
        items, futures = self._groups.setdefault(kind, ([], []))
        items.append(item)
        futures.append(future)
        return future

    def flush(self) -> None:
        """Send every batch collected so far (the end of the loop turn calls it).

        With ``max_sending`` batches already in flight nothing is sent: what
        was asked meanwhile waits and goes with the next batch when one is
        answered (a group commit: fewer, fuller round trips under load).
        """
        if self._max_sending is not None and len(self._sending) >= self._max_sending:
            return
        groups, self._groups = self._groups, {}
        for kind, (items, futures) in groups.items():
            task = asyncio.ensure_future(answer_each(futures, self._send(kind, items)))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._groups:
            self.flush()

    async def drain(self) -> None:
        """Send what is collected and wait until every batch in flight is answered."""
        while self._groups or self._sending:
            self.flush()
            if self._sending:
                await asyncio.wait(set(self._sending))


def new_token() -> str:
    """Return a fresh, unguessable claim token naming its owner.

    128 random bits as 32 hex digits, then ``@`` and this process (see
    :func:`pigeon.idempotency.owner.owner`).
    """
    return os.urandom(16).hex() + "@" + owner()  # urandom: a quarter of uuid4's cost


class IdempotencyStore(abc.ABC):
    """Remembers which keys were claimed and handled.

    Every method is safe to call concurrently from tasks of one event loop;
    the shared stores (SQLite, Redis, PostgreSQL) are also safe across
    processes. ``retention`` is fixed when a key is marked done: changing it
    later does not move the expiry of rows already written.
    """

    retention: float

    def __init__(self, *, retention: float) -> None:
        if not retention > 0:
            raise ConfigurationError(
                f"retention must be a positive number of seconds, got {retention!r}"
            )
        self.retention = float(retention)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if missing. Calling it again is a no-op.

        Raises ``ConnectionError`` (or the driver's error) when the store is unreachable.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads. Calling it again is a no-op."""

    @abc.abstractmethod
    async def claim(self, key: str, lease: float) -> Claim:
        """Atomically take ``key`` for ``lease`` seconds if nobody holds it.

        Free key or expired claim: ``CLAIMED`` with a fresh token. Done and
        within retention: ``DONE``. Someone else's unexpired claim:
        ``IN_PROGRESS`` with ``retry_after``. Of many concurrent callers,
        exactly one gets ``CLAIMED``.
        """

    @abc.abstractmethod
    async def extend(self, key: str, token: str, lease: float) -> bool:
        """Renew a claim still held with ``token`` for another ``lease`` seconds.

        Lets a long handler keep its key: call it well before the lease ends.
        Returns ``False`` when the claim is lost (expired, released, done or
        taken by another claimer); then another worker may run the handler too.
        """

    @abc.abstractmethod
    async def done(self, key: str, token: str) -> None:
        """Mark ``key`` handled for ``retention`` seconds.

        Succeeds even if the lease expired meanwhile: the side effect happened,
        so the key must read as done whoever holds it now.
        """

    @abc.abstractmethod
    async def release(self, key: str, token: str) -> None:
        """Give ``key`` back so it can be claimed again.

        Deletes only a claim still held with ``token``: a stale holder whose
        lease expired cannot free someone else's claim, and a done key stays done.
        """

    async def record_outcome(self, key: str, settled: int) -> None:
        """Remember that every delivery of ``key`` up to attempt ``settled`` is finished.

        Called after a retry copy (``settled`` = its attempt - 1) or a dead letter
        (``settled`` = the last attempt) was confirmed and before the original
        is acked, so a redelivery of the original (the process died before the
        ack) is acked without running anything. Kept for ``retention``. A store
        that does not override it records nothing: then the redelivery runs again.
        """
        return None

    async def recorded_outcome(self, key: str) -> int | None:
        """The ``settled`` attempt last recorded for ``key``, or ``None``."""
        return None

    @abc.abstractmethod
    async def purge(self) -> int:
        """Delete done rows past retention and expired claims; return how many."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
