"""An AsyncAPI 3.0 document of the events some apps send and receive.

Why: other teams (and other languages) need the contract of the bus without
reading Python. ``pigeon asyncapi MODULE:APP ...`` writes it; :func:`build`
returns it as a dict.

What the document holds, and promises:

- one **channel per event name** (channel id and ``address`` = the routing
  key), bound (AMQP binding ``is: routingKey``) to the topic exchange;
- one **message per event** in ``components.messages``: the payload is the
  pydantic ``model_json_schema()`` of its :class:`~pigeon.Event` class (nested
  models in ``components.schemas``), or "any JSON object" for an event known
  only by name; ``headers`` describes ``x-pigeon-causation-id``,
  ``x-pigeon-event-version`` and ``traceparent``; the extension
  ``x-pigeon-properties`` describes the AMQP properties (``message_id``,
  ``correlation_id``, ``type``, ``app_id``, ``content_type``,
  ``delivery_mode``, ``timestamp``), which AsyncAPI has no field for;
- a ``send`` operation per event an app declares with
  ``Pigeon(dispatches=[...])``, and a ``receive`` operation per listener queue
  and channel. A **pattern** binding (``order.*``) receives from the channel of
  every event it matches among those the documented apps name and those
  registered (imported) :class:`~pigeon.Event` classes; only a pattern that
  matches none of them gets a channel of its own with the pattern as its
  address (AsyncAPI has no wildcard channels, and concrete channels keep the
  payload schemas);
- ``servers`` from each app's ``PIGEON_URL``; the password never appears.

The output is deterministic for the same apps, so it can be committed and diffed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic.json_schema import models_json_schema

from pigeon import headers as h
from pigeon.core.topology import matches
from pigeon.errors import ConfigurationError
from pigeon.events import Event, lookup, registered, validate_event_name
from pigeon.settings import broker_urls, mask_url

if TYPE_CHECKING:
    from pigeon.app import Pigeon

__all__ = ["ASYNCAPI_VERSION", "build", "render"]

ASYNCAPI_VERSION = "3.0.0"
Document = dict[str, Any]
ANY_EVENT = "any-event"
"""The message of a pattern channel: an event with no registered class."""

_HEADERS: dict[str, Document] = {
    h.CAUSATION_ID: {"type": "string", "description": "message_id of the event being handled."},
    h.EVENT_VERSION: {"type": "integer", "description": "Schema version of a typed event."},
    h.TRACEPARENT: {
        "type": "string",
        "description": "W3C trace context, when tracing is on.",
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    },
}
_PROPERTIES: dict[str, Document] = {
    "message_id": {"type": "string", "description": "Unique (uuid4); handled once per listener."},
    "correlation_id": {
        "type": "string",
        "description": "Inherited from the cause, else message_id.",
    },
    "type": {"type": "string", "description": "The event name; read before the routing key."},
    "app_id": {"type": "string", "description": "The publishing service (PIGEON_SERVICE)."},
    "content_type": {"const": "application/json"},
    "delivery_mode": {"const": 2, "description": "Persistent."},
    "timestamp": {"type": "integer", "description": "Seconds since the epoch, UTC."},
}


def _amqp(**fields: Any) -> Document:
    return {"amqp": {**fields, "bindingVersion": "0.3.0"}}


def _is_pattern(binding: str) -> bool:
    return any(word in ("*", "#") for word in binding.split("."))


def _pattern_id(pattern: str) -> str:
    return "pattern." + pattern.replace("*", "star").replace("#", "hash")


class _Builder:
    def __init__(self, apps: Sequence[Pigeon]) -> None:
        if not apps:
            raise ConfigurationError("asyncapi needs at least one app (MODULE:APP)")
        exchanges = sorted({app.settings.exchange for app in apps})
        if len(exchanges) > 1:
            raise ConfigurationError(
                f"these apps publish to different exchanges ({', '.join(exchanges)}); "
                "they are different buses: document each one separately"
            )
        self.apps = apps
        self.exchange = exchanges[0]
        path = urlsplit(broker_urls(apps[0].settings.url)[0]).path
        self.vhost = unquote(path[1:]) if len(path) > 1 else "/"
        self.classes: dict[str, type[Event]] = {}
        self.producers: dict[str, list[str]] = {}
        self.channels: Document = {}
        self.messages: Document = {}
        self.operations: Document = {}

    def event_name(self, target: type[Event] | str) -> str:
        if isinstance(target, str):
            return validate_event_name(target)
        self.classes[target.event_name()] = target
        return target.event_name()

    def event_names(self) -> list[str]:
        """Events the apps name, plus registered ones a pattern binding matches."""
        names: set[str] = set()
        patterns: set[str] = set()
        for app in self.apps:
            for target in app.dispatches:
                name = self.event_name(target)
                names.add(name)
                self.producers.setdefault(name, []).append(app.service or "")
            for listener in app.listeners:
                if listener.event_type is not None and listener.event_type.__event_name__:
                    self.event_name(listener.event_type)
                names |= {p for p in listener.patterns if not _is_pattern(p)}
                patterns |= {p for p in listener.patterns if _is_pattern(p)}
        candidates = names | set(registered())
        return sorted(names | {n for n in candidates for p in patterns if matches(p, n)})

    def build(self, title: str | None, version: str | None) -> Document:
        names = self.event_names()
        typed = {n: c for n in names if (c := self.classes.get(n) or lookup(n)) is not None}
        refs, defs = models_json_schema(
            [(cls, "validation") for cls in typed.values()],
            ref_template="#/components/schemas/{model}",
        )
        for name in names:
            cls = typed.get(name)
            payload = dict(refs[(cls, "validation")]) if cls is not None else None
            self.add_message(name, cls, payload)
            self.add_channel(name, name, name)
        for app in self.apps:
            self.add_operations(app, names)
        services = ", ".join(app.service or "(no service)" for app in self.apps)
        description = (
            f"Events on the RabbitMQ topic exchange `{self.exchange}` sent and received by "
            f"{services}. One AMQP message is one event: routing key = event name, body = the "
            "payload as UTF-8 JSON, metadata in AMQP properties (`x-pigeon-properties`) and "
            f"headers; see docs/wire-format.md. Generated by pigeon-bus {_version()}."
        )
        return {
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": title or f"Pigeon events: {services}",
                "version": version or "1.0.0",
                "description": description,
            },
            "servers": self.servers(),
            "defaultContentType": "application/json",
            "channels": self.channels,
            "operations": self.operations,
            "components": {"schemas": defs.get("$defs", {}), "messages": self.messages},
        }

    def servers(self) -> Document:
        servers: Document = {}
        for url in dict.fromkeys(app.settings.url for app in self.apps):
            parts = urlsplit(url)
            host = parts.hostname or "localhost"
            server: Document = {
                "host": f"{host}:{parts.port}" if parts.port is not None else host,
                "protocol": parts.scheme or "amqp",
                "protocolVersion": "0.9.1",
                "description": f"RabbitMQ at PIGEON_URL {mask_url(url)}",
            }
            if parts.path not in ("", "/"):
                server["pathname"] = parts.path
            servers["rabbitmq" if not servers else f"rabbitmq-{len(servers) + 1}"] = server
        return servers

    def add_message(self, key: str, cls: type[Event] | None, payload: Document | None) -> None:
        name = None if key == ANY_EVENT else key
        headers = {k: dict(v) for k, v in _HEADERS.items()}
        properties = {k: dict(v) for k, v in _PROPERTIES.items()}
        if cls is not None:
            headers[h.EVENT_VERSION]["const"] = cls.__event_version__
        if name is not None:
            properties["type"]["const"] = name
        if producers := sorted(set(self.producers.get(key, [])) - {""}):
            properties["app_id"]["examples"] = producers
        message: Document = {"name": key, "title": cls.__name__ if cls is not None else key}
        if cls is not None and cls.__doc__:
            message["summary"] = cls.__doc__.strip().split("\n\n", 1)[0]
        message["contentType"] = "application/json"
        message["payload"] = payload or {"type": "object", "description": "Any JSON object."}
        message["headers"] = {"type": "object", "properties": headers}
        if name is not None:
            message["bindings"] = _amqp(messageType=name)
        message["x-pigeon-properties"] = {"type": "object", "properties": properties}
        self.messages[key] = message

    def add_channel(self, channel_id: str, address: str, message: str) -> None:
        exchange = {"name": self.exchange, "type": "topic", "durable": True, "autoDelete": False}
        self.channels[channel_id] = {
            "address": address,
            "description": f"Routing key `{address}` on the topic exchange `{self.exchange}`.",
            "messages": {message: {"$ref": f"#/components/messages/{message}"}},
            "bindings": _amqp(**{"is": "routingKey"}, exchange={**exchange, "vhost": self.vhost}),
        }

    def operation(
        self, action: str, channel: str, service: str, title: str, bindings: Document
    ) -> Document:
        message = next(iter(self.channels[channel]["messages"]))
        return {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "title": title,
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
            "bindings": bindings,
            "tags": [{"name": service}],
            "x-pigeon-service": service,
        }

    def add_operations(self, app: Pigeon, names: list[str]) -> None:
        service = app.service or "app"
        publish = _amqp(deliveryMode=2, timestamp=True, mandatory=False)
        for target in app.dispatches:
            name = self.event_name(target)
            title = f"{service} dispatches {name}"
            op_id = f"{service}.dispatch.{name}"
            self.operations[op_id] = self.operation("send", name, service, title, publish)
        for listener in app.listeners:
            for pattern in listener.patterns:
                channels = [n for n in names if matches(pattern, n)]
                if not channels:
                    channels = [_pattern_id(pattern)]
                    if channels[0] not in self.channels:
                        self.add_message(ANY_EVENT, None, None)
                        self.add_channel(channels[0], pattern, ANY_EVENT)
                for channel in channels:
                    title = f"{listener.queue} receives {channel}"
                    op = self.operation("receive", channel, service, title, _amqp(ack=True))
                    op["description"] = (
                        f"Listener `{listener.name}` of {service} consumes queue "
                        f"`{listener.queue}`, bound with `{pattern}`."
                    )
                    op["x-pigeon-queue"] = listener.queue
                    op["x-pigeon-listener"] = listener.name
                    op["x-pigeon-binding"] = pattern
                    self.operations[f"{listener.queue}.receive.{channel}"] = op


def _version() -> str:
    try:
        return metadata.version("pigeon-bus")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "(source)"


def build(
    apps: Sequence[Pigeon], *, title: str | None = None, version: str | None = None
) -> Document:
    """The AsyncAPI 3.0 document of ``apps`` as a JSON-ready dict.

    Raises :class:`~pigeon.ConfigurationError` when no app is given or the apps
    use different exchanges (they would be different buses).
    """
    return _Builder(apps).build(title, version)


def render(document: Document, fmt: Literal["json", "yaml"] = "json") -> str:
    """``document`` as JSON or YAML text; YAML needs PyYAML (``pip install 'pigeon-bus[yaml]'``)."""
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    try:
        import yaml
    except ImportError as exc:
        raise ConfigurationError(
            "--format yaml needs PyYAML: pip install 'pigeon-bus[yaml]' (or use --format json)"
        ) from exc

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(document, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)
