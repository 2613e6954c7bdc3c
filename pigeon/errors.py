"""Exceptions a user of Pigeon can catch; each message says what to do next."""

from __future__ import annotations


class PigeonError(Exception):
    """Base class of every error Pigeon raises on purpose."""


class ConfigurationError(PigeonError):
    """The app or a listener is set up in a way that cannot work."""


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

    The event was *not* silently dropped: the caller decides (fail the request,
    store it in an outbox, retry later). ``__cause__`` holds the last error.
    """


class TopologyError(PigeonError):
    """The broker's exchanges or queues disagree with what the app declares."""
