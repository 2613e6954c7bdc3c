"""The ``pigeon`` command: a thin shell over the library."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import ValidationError

from pigeon.amqp import RETRYABLE
from pigeon.app import Pigeon, default_app
from pigeon.errors import (
    BrokerRefused,
    ConfigurationError,
    DispatchError,
    SettingsError,
    TopologyError,
)
from pigeon.events import Event, lookup, registered
from pigeon.logs import configure_logging
from pigeon.outbox.cli import outbox_group
from pigeon.settings import Settings, mask_url

EX_CONFIG = 78


def load_app(target: str) -> Pigeon:
    """Import ``module:attribute`` (attribute defaults to ``app``) and return the Pigeon app."""
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}") from exc
    except ConfigurationError as exc:
        click.echo(f"pigeon: {target}: {exc}", err=True)
        sys.exit(EX_CONFIG)
    if not hasattr(module, attr or "app"):
        raise click.BadParameter(
            f"module {module_name!r} has no attribute {attr or 'app'!r} (use MODULE:ATTRIBUTE)"
        )
    app = getattr(module, attr or "app")
    if not isinstance(app, Pigeon):
        raise click.BadParameter(
            f"{target} is a {type(app).__name__}, not a pigeon.Pigeon app (use MODULE:ATTRIBUTE)"
        )
    return app


@click.group()
@click.version_option(package_name="pigeon-bus", prog_name="pigeon")
def main() -> None:
    """Pigeon: a choreography event bus over RabbitMQ."""
    try:
        settings = Settings()
    except SettingsError as exc:
        click.echo(f"pigeon: {exc}", err=True)
        sys.exit(EX_CONFIG)
    configure_logging(settings.log_format, settings.log_level)


@main.command()
@click.argument("target")
@click.option("--listener", "listeners", multiple=True, help="Run only this listener (repeatable).")
@click.option(
    "--concurrency", default=10, show_default=True, help="Handlers running at once per listener."
)
@click.option(
    "--prefetch",
    type=int,
    default=None,
    help="Unacked messages per listener [10 x concurrency]. Deeper than concurrency so the "
    "idempotency store and the acks work in batches; after a crash that many come back "
    "(idempotency absorbs the duplicates). Lower it for slow handlers shared by replicas.",
)
@click.option("--max-messages", type=int, default=None, help="Exit 0 after handling N messages.")
@click.option("--max-memory", type=float, default=None, help="Exit 0 once RSS exceeds MB.")
@click.option(
    "--shutdown-timeout", default=30.0, show_default=True, help="Seconds to drain on stop."
)
@click.option(
    "--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port."
)
@click.option("--metrics-host", default="0.0.0.0", show_default=True, help="Address for metrics.")
def listen(
    target: str,
    listeners: tuple[str, ...],
    concurrency: int,
    prefetch: int | None,
    max_messages: int | None,
    max_memory: float | None,
    shutdown_timeout: float,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run the listeners of MODULE:APP until SIGTERM/SIGINT."""
    from pigeon.worker import Worker

    app = load_app(target)
    try:
        worker = Worker(
            app,
            listeners=listeners,
            concurrency=concurrency,
            prefetch=prefetch,
            shutdown_timeout=shutdown_timeout,
            max_messages=max_messages,
            max_memory=max_memory,
            freeze_heap=True,
        )
        code = asyncio.run(_serve(worker, metrics_port, metrics_host))
    except (TopologyError, ConfigurationError) as exc:
        click.echo(f"pigeon: {exc}", err=True)
        sys.exit(EX_CONFIG)
    sys.exit(code)


async def _serve(worker: Any, metrics_port: int | None, metrics_host: str) -> int:
    if metrics_port is not None:
        from pigeon.metrics import serve_metrics

        try:
            serve_metrics(metrics_port, worker.ready.is_set, host=metrics_host)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {metrics_host}:{metrics_port} ({exc.strerror or exc}): "
                "pick a free --metrics-port"
            ) from None
    code: int = await worker.run()
    return code


@main.command("dispatch")
@click.argument("event_name")
@click.argument("payload", required=False)
@click.option("--message-id", default=None)
@click.option("--correlation-id", default=None)
@click.option("--header", "headers", multiple=True, help="KEY=VALUE (repeatable).")
@click.option(
    "--app",
    "target",
    default=None,
    metavar="MODULE:APP",
    help="Validate PAYLOAD against the Event class registered for EVENT_NAME.",
)
def dispatch_command(
    event_name: str,
    payload: str | None,
    message_id: str | None,
    correlation_id: str | None,
    headers: tuple[str, ...],
    target: str | None,
) -> None:
    """Dispatch EVENT_NAME with a JSON PAYLOAD and print its message id once confirmed.

    With --app, the payload is validated against the app's Event class first and
    may be left out when every field has a default.
    """
    if payload is None and target is None:
        raise click.UsageError(
            'give the event\'s JSON PAYLOAD (e.g. \'{"order_id": "o-1"}\'), or --app '
            "MODULE:APP to validate it against the registered Event class"
        )
    data = _payload(payload or "{}")
    header_map = _headers(headers)
    app = default_app() if target is None else load_app(target)
    event: Event | str = event_name if target is None else _validated(event_name, data)
    try:
        message_id = app.dispatch(
            event,
            None if isinstance(event, Event) else data,
            message_id=message_id,
            correlation_id=correlation_id,
            headers=header_map,
        )
    except (DispatchError, ConfigurationError) as exc:
        click.echo(f"pigeon: {exc}", err=True)
        sys.exit(EX_CONFIG if isinstance(exc.__cause__, BrokerRefused) else 1)
    click.echo(message_id)


def _payload(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"PAYLOAD is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise click.BadParameter("PAYLOAD must be a JSON object")
    return data


def _headers(items: tuple[str, ...]) -> dict[str, str]:
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--header")
    return dict(item.split("=", 1) for item in items)


def _validated(event_name: str, data: dict[str, Any]) -> Event:
    """The payload as the app's Event class for ``event_name``; one line when it does not fit."""
    event_type = lookup(event_name)
    if event_type is None:
        known = ", ".join(sorted(registered())) or "none"
        raise click.BadParameter(
            f"no Event class is registered for {event_name!r} (known: {known})",
            param_hint="EVENT_NAME",
        )
    try:
        return event_type.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'payload'}: {error['msg']}"
            for error in exc.errors()
        )
        raise click.BadParameter(
            f"does not match {event_type.__name__}: {problems}", param_hint="PAYLOAD"
        ) from None


@main.group("topology")
def topology_group() -> None:
    """Show or declare the exchanges and queues of an app."""


@topology_group.command("show")
@click.argument("target")
def topology_show(target: str) -> None:
    """Print what MODULE:APP declares."""
    click.echo(load_app(target).topology().describe())


@topology_group.command("declare")
@click.argument("target")
def topology_declare(target: str) -> None:
    """Declare everything MODULE:APP needs, ahead of deploy."""
    app = load_app(target)

    async def declare() -> None:
        try:
            await app.declare()
        finally:
            await app.close()

    try:
        asyncio.run(declare())
    except (TopologyError, ConfigurationError) as exc:
        click.echo(f"pigeon: {exc}", err=True)
        sys.exit(EX_CONFIG)
    except RETRYABLE as exc:
        click.echo(
            f"pigeon: cannot reach the broker at {mask_url(app.settings.url)}: {exc}", err=True
        )
        sys.exit(1)
    click.echo(app.topology().describe())


@main.command("asyncapi")
@click.argument("targets", nargs=-1, required=True, metavar="MODULE:APP...")
@click.option(
    "--format", "fmt", type=click.Choice(["json", "yaml"]), default="json", show_default=True
)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write to FILE, not stdout.")
@click.option("--title", default=None, help="info.title [Pigeon events: SERVICES].")
@click.option("--api-version", default=None, help="info.version [1.0.0].")
def asyncapi_command(
    targets: tuple[str, ...],
    fmt: Literal["json", "yaml"],
    output: str | None,
    title: str | None,
    api_version: str | None,
) -> None:
    """Write the AsyncAPI 3.0 document of the events MODULE:APP... send and receive."""
    from pigeon.asyncapi import build, render

    apps = [load_app(target) for target in targets]
    try:
        text = render(build(apps, title=title, version=api_version), fmt)
    except ConfigurationError as exc:
        click.echo(f"pigeon: {exc}", err=True)
        sys.exit(EX_CONFIG)
    if output is None:
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text, encoding="utf-8")


main.add_command(outbox_group)
