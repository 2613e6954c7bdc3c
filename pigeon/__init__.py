"""Pigeon: a choreography event bus for Python services over RabbitMQ."""

# The old module pigeon.dispatch first: loading it later would bind the name
# ``pigeon.dispatch`` to the module instead of the function below.
import pigeon.dispatch  # noqa: F401  # isort: skip
from pigeon.app import Pigeon, close, default_app, dispatch, dispatch_async, set_default_app
from pigeon.core.listener import Context, Listener
from pigeon.core.messages import Outcome, OutcomeKind
from pigeon.core.processor import Delivery
from pigeon.errors import (
    BrokerRefused,
    ConfigurationError,
    DispatchError,
    DispatchManyError,
    InvalidHeaderError,
    PigeonError,
    TopologyError,
)
from pigeon.events import Event
from pigeon.logs import configure_logging
from pigeon.retry import Reject, Retry, RetryLater
from pigeon.settings import Settings

__all__ = [
    "BrokerRefused",
    "ConfigurationError",
    "Context",
    "Delivery",
    "DispatchError",
    "DispatchManyError",
    "Event",
    "InvalidHeaderError",
    "Listener",
    "Outcome",
    "OutcomeKind",
    "Pigeon",
    "PigeonError",
    "Reject",
    "Retry",
    "RetryLater",
    "Settings",
    "TopologyError",
    "close",
    "configure_logging",
    "default_app",
    "dispatch",
    "dispatch_async",
    "set_default_app",
]
