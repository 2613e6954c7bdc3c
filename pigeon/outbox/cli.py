"""``pigeon outbox relay|status``: the outbox from a shell or a supervisor."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from pigeon.errors import ConfigurationError
from pigeon.settings import mask_url

EX_CONFIG = 78


@click.group("outbox")
def outbox_group() -> None:
    """Relay and inspect a transactional outbox (see docs/outbox.md)."""


def _outbox(
    database_url: str, table: str, inbox_table: str, retention: float | None = None
) -> object:
    from pigeon.outbox.box import DEFAULT_RETENTION, Outbox

    try:
        return Outbox(
            database_url,
            table=table,
            inbox_table=inbox_table,
            retention=DEFAULT_RETENTION if retention is None else retention,
        )
    except (ConfigurationError, ImportError) as exc:
        click.echo(f"pigeon: {mask_url(database_url)}: {exc}", err=True)
        sys.exit(EX_CONFIG)


@outbox_group.command("relay")
@click.argument("database_url")
@click.option("--table", default="pigeon_outbox", show_default=True, help="Outbox table name.")
@click.option("--inbox-table", default="pigeon_inbox", show_default=True, help="Inbox table.")
@click.option("--batch-size", default=500, show_default=True, help="Rows per claim.")
@click.option(
    "--lease",
    type=float,
    default=None,
    help="SQLite: seconds a claim protects rows; a publish gets half [60].",
)
@click.option(
    "--poll-interval", type=float, default=None, help="Fallback poll [10 s PG, 1 s SQLite]."
)
@click.option("--retention", type=float, default=None, help="Keep published rows S seconds [3600].")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics here.")
@click.option(
    "--create-tables", is_flag=True, help="Create the outbox and inbox tables if they are missing."
)
def relay_command(
    database_url: str,
    table: str,
    inbox_table: str,
    batch_size: int,
    lease: float | None,
    poll_interval: float | None,
    retention: float | None,
    metrics_port: int | None,
    create_tables: bool,
) -> None:
    """Publish the committed rows of DATABASE_URL's outbox until SIGTERM/SIGINT (exit 0).

    DATABASE_URL: postgresql+psycopg://, postgresql+asyncpg:// or sqlite:///path.
    """
    from pigeon.outbox.box import Outbox
    from pigeon.outbox.relay import Relay

    box = _outbox(database_url, table, inbox_table, retention)
    assert isinstance(box, Outbox)
    relay = Relay(box, batch_size=batch_size, lease=lease, poll_interval=poll_interval)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop, signal.Signals(sig).name)
        if metrics_port is not None:
            from pigeon.metrics import serve_metrics

            serve_metrics(metrics_port, relay)  # type: ignore[arg-type]
        try:
            if create_tables:
                await box.create_tables_async()
            return await relay.run()
        finally:
            from pigeon.app import default_app

            await default_app().close()
            await box.relay_engine().dispose()

    sys.exit(asyncio.run(run()))


@outbox_group.command("status")
@click.argument("database_url")
@click.option("--table", default="pigeon_outbox", show_default=True, help="Outbox table name.")
def status_command(database_url: str, table: str) -> None:
    """Print the pending rows of DATABASE_URL's outbox and the oldest one's age."""
    from pigeon.outbox.box import Outbox
    from pigeon.outbox.relay import status

    box = _outbox(database_url, table, "pigeon_inbox")
    assert isinstance(box, Outbox)

    async def run() -> tuple[int, float | None]:
        try:
            return await status(box)
        finally:
            await box.relay_engine().dispose()

    pending, age = asyncio.run(run())
    click.echo(f"pending {pending}")
    click.echo(f"oldest_age_seconds {age:.3f}" if age is not None else "oldest_age_seconds -")
