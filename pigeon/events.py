"""Typed events: pydantic models that know their routing key.

``class OrderPlaced(Event, name="order.placed")`` registers the class under its
name, so listeners bound to patterns (``order.*``) can turn a message back into
the right type. The body on the wire is the model's JSON, nothing wrapped
around it (``docs/wire-format.md``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from pigeon.errors import ConfigurationError

_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_registry: dict[str, type[Event]] = {}


def validate_event_name(name: str) -> str:
    """Return ``name`` if it can be a routing key (dot-separated words), else raise."""
    if not _NAME.match(name):
        raise ConfigurationError(
            f"event name {name!r} is not a routing key: use dot-separated words "
            "of letters, digits, '-' or '_' (e.g. 'order.placed')"
        )
    return name


class Event(BaseModel):
    """Base class of typed events.

    Subclasses pass their routing key as a class keyword and may pass a
    ``version`` (sent as ``x-pigeon-event-version``)::

        class OrderPlaced(Event, name="order.placed"):
            order_id: str

    Unknown fields in an incoming payload are ignored, so producers can add
    fields without breaking older consumers.
    """

    model_config = ConfigDict(extra="ignore")

    __event_name__: ClassVar[str] = ""
    __event_version__: ClassVar[int] = 1

    def __init_subclass__(cls, name: str | None = None, version: int = 1, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.__event_name__ = validate_event_name(name)
            cls.__event_version__ = version
            _register(name, cls)

    @classmethod
    def event_name(cls) -> str:
        """The routing key of this event type; raises if the class has none."""
        if not cls.__event_name__:
            raise ConfigurationError(
                f"{cls.__qualname__} has no event name: declare it as "
                f"`class {cls.__name__}(Event, name='thing.happened')`"
            )
        return cls.__event_name__

    def to_json(self) -> bytes:
        """The wire body: this event's fields as UTF-8 JSON."""
        return self.__pydantic_serializer__.to_json(self)


def _register(name: str, cls: type[Event]) -> None:
    """Refuse a second, different class for one event name: a listener bound to a pattern
    would validate with whichever was imported last. The same class imported again (a
    reload, a module run as ``__main__`` and imported) replaces the first."""
    existing = _registry.get(name)
    same = existing is not None and (
        existing.__qualname__ == cls.__qualname__
        and (
            existing.__module__ == cls.__module__
            or "__main__" in (existing.__module__, cls.__module__)
        )
    )
    if existing is not None and not same:
        raise ConfigurationError(
            f"event name {name!r} is taken by {existing.__module__}.{existing.__qualname__}; "
            f"{cls.__module__}.{cls.__qualname__} needs another name (or import the first one)"
        )
    _registry[name] = cls


def lookup(name: str) -> type[Event] | None:
    """The event class registered under ``name``, if any module defined one."""
    return _registry.get(name)


def registered() -> Mapping[str, type[Event]]:
    """A read-only view of every registered event name and its class."""
    return dict(_registry)


def encode_payload(payload: Mapping[str, Any] | Event) -> bytes:
    """Serialize a typed event or a plain mapping to the wire body."""
    if isinstance(payload, Event):
        return payload.to_json()
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str).encode()
