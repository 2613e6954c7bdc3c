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


class DispatchError(PigeonError):
    """An event could not be confirmed by the broker within the dispatch timeout.

    The event was *not* silently dropped: the caller decides (fail the request,
    store it in an outbox, retry later). ``__cause__`` holds the last error.
    """


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
