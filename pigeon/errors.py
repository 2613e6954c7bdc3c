"""Exceptions a user of Pigeon can catch; each message says what to do next.

One tree: everything Pigeon raises on purpose is a :class:`PigeonError`,
including the two a handler raises to steer its message
(:class:`~pigeon.RetryLater`, :class:`~pigeon.Reject`, in :mod:`pigeon.retry`).
A class's module and name are on the wire (a dead letter's
``x-pigeon-exception-type``, which LetterThief groups by), so a class that
moves keeps the ``__module__`` it was first published under.
"""

from __future__ import annotations


class PigeonError(Exception):
    """Base class of every error Pigeon raises on purpose."""


class ConfigurationError(PigeonError, ValueError):
    """The app, a listener or a setting is set up in a way that cannot work.

    ``pigeon listen`` exits 78 (EX_CONFIG) on it, so a supervisor stops
    restarting. It is also a ``ValueError``, which some of these were before.
    """


class SettingsError(ConfigurationError, ValueError):
    """An environment variable (``PIGEON_*``, ``LETTERTHIEF_*``) holds a value that cannot work.

    The message is one line naming the variable and what it accepts.
    """


class BrokerRefused(ConfigurationError):
    """The broker answered but refused this client for good: wrong user or password, a
    vhost that does not exist or is not granted, or a failed TLS handshake.

    Retrying cannot cure it, so it is raised at once (``dispatch`` wraps it in
    :class:`DispatchError`; ``pigeon listen`` exits 78). Refused connections and
    timeouts are outages, retried as before.
    """


class DispatchError(PigeonError):
    """An event could not be confirmed by the broker within the dispatch timeout.

    The event was *not* silently dropped, but it **may have been stored**: a
    confirm lost with its connection looks the same as a publish that never
    arrived. Retry with the same message id (listeners then skip the copy),
    or fail the request, or store it in an outbox. ``__cause__`` holds the
    last error.
    """


class DispatchManyError(DispatchError):
    """Some events of a ``dispatch_many`` batch were not confirmed.

    ``confirmed`` and ``unconfirmed`` are message ids, in the batch's order.
    The unconfirmed ones may have been stored too: dispatch them again with
    the same ids (``dispatch_many(..., message_ids=e.unconfirmed)`` for those
    events) so listeners skip any copy. ``errors`` maps each unconfirmed id to
    its error: a :class:`DispatchError` (no confirm in time: try again), or
    the error that kept the message from being sent at all (it cannot be
    encoded: a ``ValueError`` or ``TypeError``; no retry cures it).
    """

    def __init__(
        self,
        message: str,
        *,
        confirmed: list[str],
        unconfirmed: list[str],
        errors: dict[str, Exception] | None = None,
    ) -> None:
        super().__init__(message)
        self.confirmed = confirmed
        self.unconfirmed = unconfirmed
        self.errors: dict[str, Exception] = errors or {}


class TopologyError(PigeonError):
    """The broker's exchanges or queues disagree with what the app declares."""


class HandlerTimeout(PigeonError):
    """The handler ran past its listener's ``timeout=`` and was cancelled."""

    __module__ = "pigeon.delivery"  # its wire name: pigeon.delivery.HandlerTimeout


class InvalidMessage(PigeonError):
    """The message cannot be handled by any retry: wrong type, size or schema."""

    __module__ = "pigeon.delivery"  # its wire name: pigeon.delivery.InvalidMessage

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidHeaderError(DispatchError, ValueError):
    """A header key or value has no AMQP encoding; raised before anything is published.

    ``key`` is the header's key. See :mod:`pigeon.tables` for what can be encoded.
    """

    def __init__(self, key: object, problem: str) -> None:
        super().__init__(
            f"header {key!r} cannot be sent over AMQP: {problem}. Nothing was published; "
            "change or remove the header (see pigeon.tables for the types that can be sent)."
        )
        self.key = key
