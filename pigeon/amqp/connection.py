"""One AMQP connection per app and event loop, opened on demand and re-opened after loss.

Plain (non-robust) aio-pika connections: Pigeon decides itself what to do on
a lost connection — a dispatcher re-opens and re-declares on its next try, a
worker rebuilds its consumers — rather than relying on a transparent restore
that can come back without its consumers. Every URL in a log line or error
message is masked.

``PIGEON_URL`` may name several nodes of one cluster (comma-separated). The
connector tries them in turn, shuffled per process so load spreads, and after
losing a node it starts with the next one: a client never waits for a dead
node while another answers. Its ``masked_url`` names the node in use.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import AMQPError
from pamqp.commands import Connection
from pamqp.exceptions import PAMQPException

from pigeon.amqp import unmarshal
from pigeon.errors import BrokerRefused
from pigeon.logs import get_logger
from pigeon.settings import Settings, broker_urls, mask_url

log = get_logger("pigeon")

unmarshal.install()  # one message's undecodable bytes must never close a connection

OnConnect = Callable[[AbstractConnection], Awaitable[None]]

CONNECT_TIMEOUT = 10.0
"""Seconds one node may take to accept a connection before the next node is tried."""

CONNECT_ERRORS = (AMQPError, ConnectionError, OSError, TimeoutError)
"""What a node that is down, starting, stopping or unreachable raises on connect."""

CLUSTER_HEARTBEAT = 5
"""AMQP heartbeat (seconds) asked for when ``PIGEON_URL`` lists several nodes and a URL names
none: aiormq gives a silent node three heartbeats and a second, so a client on a hung or
partitioned node moves to the next one after about 18 s (with RabbitMQ's 60 s, three minutes)."""

NEXT_NODE_AFTER = 1.0
"""Seconds a silent node is waited for alone before the next node is tried alongside it."""


def _who(url: str) -> tuple[str, str]:
    """The user and vhost of ``url``, as the broker sees them (AMQP URI defaults)."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return unquote(parts.username or "guest"), vhost


def refusal(url: str, exc: BaseException) -> BrokerRefused | None:
    """A :class:`BrokerRefused` naming the cause if ``exc`` is a permanent refusal, else None.

    Permanent: ACCESS_REFUSED at login, NOT_ALLOWED (530) for the vhost at
    Connection.Open, a TLS handshake error. Everything else (connection
    refused, timeouts, resets) is an outage the caller retries.
    """
    user, vhost = _who(url)
    where = mask_url(url)
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return BrokerRefused(
            f"the broker at {where} refused user {user!r} (ACCESS_REFUSED): "
            "check the user name and password in PIGEON_URL"
        )
    close = exc.args[1] if isinstance(exc, PAMQPException) and len(exc.args) > 1 else None
    if isinstance(close, Connection.Close) and close.reply_code in (530, 403):
        return BrokerRefused(
            f"the broker at {where} refused vhost {vhost!r} for user {user!r} "
            f"({close.reply_text}): create the vhost and grant the user, or fix the "
            "vhost in PIGEON_URL"
        )
    text = " ".join(str(arg) for arg in getattr(exc, "args", ()))
    if isinstance(exc, ssl.SSLError) or ("[SSL" in text and "EOF" not in text):
        return BrokerRefused(
            f"TLS to {where} failed ({text.strip()}): check that the port speaks TLS "
            "(amqps://, usually 5671) and that the certificates are trusted"
        )
    return None


async def _release(connection: AbstractConnection) -> None:
    """Free the sockets of a connection the broker dropped (aiormq leaves them open)."""
    try:
        await connection.close()
    except Exception as exc:
        log.debug("broker.release_failed", error=repr(exc))


def _with_heartbeat(url: str, seconds: int) -> str:
    """``url`` asking for a ``seconds`` heartbeat, unless it names one itself."""
    parts = urlsplit(url)
    if any(key == "heartbeat" for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return url
    query = f"{parts.query}&heartbeat={seconds}" if parts.query else f"heartbeat={seconds}"
    return urlunsplit(parts._replace(query=query))


_closing_late: set[asyncio.Future[None]] = set()


def _close_late(attempt: asyncio.Future[AbstractConnection]) -> None:
    """Close a connection that was made after another node's had already won."""
    if attempt.cancelled() or attempt.exception() is not None:
        return
    closing = asyncio.ensure_future(_release(attempt.result()))
    _closing_late.add(closing)
    closing.add_done_callback(_closing_late.discard)


class Connector:
    """Hands out the current connection and opens a new one when it is gone.

    ``on_connect`` hooks run on every new connection before it is handed out
    (Pigeon declares its core topology there, so a broker that was reset and
    came back empty is re-declared before the first publish).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        on_connect: list[OnConnect] | None = None,
        shuffle: bool = True,
    ) -> None:
        self.urls = broker_urls(url)
        if shuffle:
            random.shuffle(self.urls)
        self._next = 0  # the node the next connect tries first
        self._current = 0  # the node of the last connection
        self.url = self.urls[0]
        self.masked_url = mask_url(self.url)
        self.name = name
        self.on_connect = list(on_connect or [])
        self.generation = 0
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self.closed = asyncio.Event()
        self._closing: asyncio.Future[None] | None = None

    @classmethod
    def for_settings(
        cls, settings: Settings, *, name: str, on_connect: list[OnConnect] | None = None
    ) -> Connector:
        """A connector to the node(s) of ``settings.url``, shuffled unless ``url_shuffle`` is off."""
        return cls(settings.url, name=name, on_connect=on_connect, shuffle=settings.url_shuffle)

    @property
    def is_open(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    async def get(self, timeout: float | None = None) -> AbstractConnection:
        """The open connection, connecting (one attempt per node) if there is none.

        ``timeout`` bounds each node's attempt (default :data:`CONNECT_TIMEOUT`).
        Raises the connection error of that attempt (a :class:`ConnectionError`
        naming every node when several were tried); callers decide whether to
        back off and retry.
        """
        connection = self._connection
        if connection is not None and not connection.is_closed:
            return connection
        async with self._lock:
            connection = self._connection
            if connection is not None and not connection.is_closed:
                return connection
            connection = await self._connect_any(timeout)
            connection.close_callbacks.add(self._on_close)
            try:
                for hook in self.on_connect:
                    await hook(connection)
            except BaseException:
                self._next = (self._next + 1) % len(self.urls)
                await connection.close()
                raise
            self.closed.clear()
            self._connection = connection
            self.generation += 1
            log.info("broker.connected", url=self.masked_url, generation=self.generation)
            return connection

    async def _open(self, url: str, timeout: float | None) -> AbstractConnection:
        if len(self.urls) > 1:
            url = _with_heartbeat(url, CLUSTER_HEARTBEAT)
        return await aio_pika.connect(
            url,
            timeout=timeout or CONNECT_TIMEOUT,
            client_properties={
                "connection_name": f"{self.name}@{socket.gethostname()}:{os.getpid()}"
            },
        )

    async def _connect_any(self, timeout: float | None) -> AbstractConnection:
        """Connect to the first node that answers, starting with ``self._next``.

        A node that refuses is skipped at once. One that neither answers nor
        refuses (a partition, an overloaded host) gets :data:`NEXT_NODE_AFTER`
        seconds before the next node is tried alongside it, so a client never
        waits out a dead node's connect timeout while another node answers.
        The first connection made wins; any later one is closed.
        """
        if len(self.urls) == 1:
            try:
                return await self._open(self.urls[0], timeout)
            except Exception as exc:
                refused = refusal(self.urls[0], exc)
                if refused is not None:
                    raise refused from None
                raise
        order = [(self._next + offset) % len(self.urls) for offset in range(len(self.urls))]
        attempts: dict[asyncio.Future[AbstractConnection], int] = {}
        failures: list[str] = []
        try:
            while order or attempts:
                if order:
                    index = order.pop(0)
                    attempts[asyncio.ensure_future(self._open(self.urls[index], timeout))] = index
                done, _ = await asyncio.wait(
                    attempts,
                    timeout=NEXT_NODE_AFTER if order else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for attempt in done:
                    index = attempts.pop(attempt)
                    url = self.urls[index]
                    error = attempt.exception()
                    if error is None:
                        self._next = self._current = index
                        self.url, self.masked_url = url, mask_url(url)
                        return attempt.result()
                    refused = refusal(url, error)
                    if refused is not None:  # users and vhosts are cluster-wide
                        raise refused from None
                    if not isinstance(error, CONNECT_ERRORS):
                        raise error
                    log.warning("broker.node_unreachable", url=mask_url(url), error=repr(error))
                    failures.append(f"{mask_url(url)}: {error!r}")
        finally:
            for attempt in attempts:
                attempt.cancel()
                attempt.add_done_callback(_close_late)
        raise ConnectionError(f"no broker node answered ({'; '.join(failures)})")

    def _on_close(self, sender: object, exc: BaseException | None = None) -> None:
        if sender is self._connection:
            self._connection = None
            self._failover()
            self.closed.set()
            if exc is not None:
                log.warning("broker.connection_lost", url=self.masked_url, error=str(exc))
                if isinstance(sender, AbstractConnection):
                    self._closing = asyncio.ensure_future(_release(sender))

    async def channel(self, *, confirms: bool = True) -> AbstractChannel:
        """A new channel on the current connection; confirmed and raising on returns."""
        connection = await self.get()
        try:
            return await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
        except RuntimeError as exc:  # aiormq: its side of the connection closed a moment ago
            if not connection.is_closed and "closed" not in str(exc):
                raise
            if self._connection is connection:  # not a newer one opened meanwhile
                self.invalidate()
            raise ConnectionError(f"the connection to {self.masked_url} closed: {exc}") from exc

    def invalidate(self) -> None:
        """Forget the connection (after an error that left it unusable); it is closed later."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._failover()
        if connection is not None and not connection.is_closed:
            self._closing = asyncio.ensure_future(connection.close())
        self.closed.set()

    def _failover(self) -> None:
        """After losing the current node, the next connect starts with the next one."""
        self._next = (self._current + 1) % len(self.urls)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            await connection.close()
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)
        self.closed.set()
