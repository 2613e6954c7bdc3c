"""Exchanges, queues and bindings: what Pigeon declares, and why.

Everything is declared idempotently on the fly (a fresh broker "just works")
and can be declared ahead of deploy with ``pigeon topology declare``. See
``docs/topology.md`` for the picture. Quorum queues replicate messages and
count deliveries, so a message that crashes its consumer again and again is
dead-lettered by the broker itself (``x-delivery-limit``).

Plain data: :mod:`pigeon.amqp.declare` sends it to the broker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import ExchangeType

from pigeon.retry import tier_queue
from pigeon.settings import Settings

DEFAULT_DELIVERY_LIMIT = 20
GROUP_SIZE = "x-quorum-initial-group-size"


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: ExchangeType
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    arguments: Mapping[str, Any]
    bindings: tuple[Binding, ...] = ()
    purpose: str = ""


@dataclass(frozen=True, slots=True)
class Topology:
    """An ordered set of exchanges and queues; declaring it twice changes nothing."""

    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()

    def __add__(self, other: Topology) -> Topology:
        exchanges = {e.name: e for e in (*self.exchanges, *other.exchanges)}
        queues = {q.name: q for q in (*self.queues, *other.queues)}
        return Topology(tuple(exchanges.values()), tuple(queues.values()))

    def describe(self) -> str:
        """A human-readable listing, as printed by ``pigeon topology show``."""
        lines = []
        for ex in self.exchanges:
            lines.append(f"exchange {ex.name} ({ex.type.value}){_fmt_args(ex.arguments)}")
        for q in self.queues:
            purpose = f"  # {q.purpose}" if q.purpose else ""
            lines.append(f"queue {q.name}{_fmt_args(q.arguments)}{purpose}")
            lines.extend(f"  bound to {b.exchange} with {b.routing_key!r}" for b in q.bindings)
        return "\n".join(lines)


def _fmt_args(arguments: Mapping[str, Any]) -> str:
    if not arguments:
        return ""
    return " " + " ".join(f"{k}={v}" for k, v in sorted(arguments.items()))


def _quorum(size: int | None = None, **extra: Any) -> dict[str, Any]:
    """Quorum queue arguments; ``size`` (``PIGEON_QUORUM_SIZE``) sets the initial group size.

    Without a size the argument is left out, and RabbitMQ places the queue on
    all nodes up to its ``quorum_cluster_size`` (3): one member on a single node.
    """
    group = {} if size is None else {GROUP_SIZE: size}
    return {"x-queue-type": "quorum", **group, **extra}


def core_topology(settings: Settings) -> Topology:
    """The shared exchanges and queues every producer and listener relies on."""
    return Topology(
        exchanges=(
            ExchangeSpec(settings.unrouted_exchange, ExchangeType.FANOUT),
            ExchangeSpec(
                settings.exchange,
                ExchangeType.TOPIC,
                {"alternate-exchange": settings.unrouted_exchange},
            ),
            ExchangeSpec(settings.dead_letter_exchange, ExchangeType.TOPIC),
        ),
        queues=(
            QueueSpec(
                settings.unrouted_queue,
                _quorum(
                    settings.quorum_size,
                    **{
                        "x-max-length": settings.unrouted_max_length,
                        "x-overflow": "reject-publish",
                    },
                ),
                (Binding(settings.unrouted_exchange, ""),),
                "events no queue was bound for; bounded, a full queue refuses the dispatch",
            ),
            QueueSpec(
                settings.dead_letter_queue,
                _quorum(settings.quorum_size),
                (Binding(settings.dead_letter_exchange, "#"),),
                "every dead letter, for LetterThief",
            ),
        ),
    )


def listener_queue(
    settings: Settings,
    name: str,
    patterns: Iterable[str],
    *,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    purpose: str = "",
) -> QueueSpec:
    """The quorum queue of one listener, dead-lettering into ``pigeon.dead`` under its own name."""
    arguments = _quorum(
        settings.quorum_size,
        **{
            "x-dead-letter-exchange": settings.dead_letter_exchange,
            "x-dead-letter-routing-key": name,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": delivery_limit,
        },
    )
    bindings = tuple(Binding(settings.exchange, p) for p in dict.fromkeys(patterns))
    return QueueSpec(name, arguments, bindings, purpose)


def retry_tier(queue: str, delay: float, *, quorum_size: int | None = None) -> QueueSpec:
    """A TTL queue that holds messages for ``delay`` seconds, then hands them back to ``queue``."""
    arguments = _quorum(
        quorum_size,
        **{
            "x-message-ttl": round(delay * 1000),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    return QueueSpec(tier_queue(queue, delay), arguments, (), f"retry tier of {queue}")


def matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic binding ``pattern`` (``*`` = one word, ``#`` = any) takes ``routing_key``."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])
