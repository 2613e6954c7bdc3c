"""``pigeon outbox relay|status``: the outbox from a shell or a supervisor."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from pigeon.errors import ConfigurationError
from pigeon.logs import get_logger
from pigeon.settings import mask_url

if TYPE_CHECKING:
    from pigeon.outbox.box import Outbox

log = get_logger("pigeon")

EX_CONFIG = 78
EX_UNAVAILABLE = 69

MAX_BATCH = 10_000
"""Each claimed row is a bind parameter: PostgreSQL takes 65,535 a statement, older SQLite
32,766; a larger batch failed every round and the relay backed off forever."""
DATABASE_TIMEOUT = 15.0
"""Seconds the CLI waits for the database to answer its first question."""
_SILENT = f"the database did not answer within {DATABASE_TIMEOUT:g}s; is it up and reachable?"

_REFUSED = (
    "does not exist",
    "authentication failed",
    "no password supplied",
    "role ",
    "permission denied",
)
"""Words of a driver's connection error that no retry cures (a typo in the URL)."""


@click.group("outbox")
def outbox_group() -> None:
    """Relay and inspect a transactional outbox (see docs/outbox.md)."""


def _outbox(
    database_url: str, table: str, inbox_table: str, retention: float | None = None
) -> Outbox:
    from sqlalchemy.exc import ArgumentError

    from pigeon.outbox.box import DEFAULT_RETENTION, Outbox

    try:
        return Outbox(
            database_url,
            table=table,
            inbox_table=inbox_table,
            retention=DEFAULT_RETENTION if retention is None else retention,
        )
    except ArgumentError:
        _fail(database_url, EX_CONFIG, "not a database URL; use " + _FORMS)
    except (ConfigurationError, ImportError) as exc:
        _fail(database_url, EX_CONFIG, str(exc))


_FORMS = "postgresql+psycopg://, postgresql+asyncpg:// or sqlite:///path"


def _fail(database_url: str, code: int, message: str) -> NoReturn:
    click.echo(f"pigeon: {mask_url(database_url)}: {message}", err=True)
    sys.exit(code)


def _columns(conn: Any, table: str) -> set[str]:
    """The column names of ``table`` (empty when there is no such table)."""
    from sqlalchemy import inspect

    inspector = inspect(conn)
    if not inspector.has_table(table):
        return set()
    return {column["name"] for column in inspector.get_columns(table)}


async def _check_database(url: str, box: Outbox, *, create: bool, relaying: bool) -> None:
    """Exit with one line when the database cannot serve this outbox.

    A URL that names no database, a refused login or a missing table is a
    mistake (exit 78). A database that does not answer is an outage: ``status``
    exits 69; the relay goes on and backs off until it answers.
    """
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from pigeon.outbox.tables import ERROR_COLUMN

    try:
        async with box.relay_engine().begin() as conn:
            if create:
                await conn.run_sync(box.metadata.create_all)
            found = await conn.run_sync(_columns, box.table.name)
    except (DBAPIError, OSError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if "unable to open database file" in detail:
            _fail(url, EX_CONFIG, "cannot open the SQLite file (does its directory exist?)")
        if any(word in detail for word in _REFUSED):
            _fail(url, EX_CONFIG, detail)
        if relaying and not create:
            return  # the relay backs off until the database answers
        _fail(url, EX_UNAVAILABLE, f"cannot reach the database ({detail}); is it running?")
    except SQLAlchemyError as exc:  # a name the database cannot take, and the like
        _fail(url, EX_CONFIG, str(exc).strip().splitlines()[0])
    required = set(box.table.c.keys()) - {ERROR_COLUMN}  # tables older than it work without it
    if found and not required <= found:
        missing = ", ".join(sorted(required - found))
        _fail(url, EX_CONFIG, f"table {box.table.name} is not an outbox table (no {missing})")
    if not found:
        _fail(
            url,
            EX_CONFIG,
            f"table {box.table.name} does not exist: start the relay with --create-tables, "
            "call outbox.create_tables() or add it to your migrations (docs/outbox.md)",
        )


@outbox_group.command("relay")
@click.argument("database_url")
@click.option("--table", default="pigeon_outbox", show_default=True, help="Outbox table name.")
@click.option("--inbox-table", default="pigeon_inbox", show_default=True, help="Inbox table.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH),
    default=500,
    show_default=True,
    help="Rows per claim.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="SQLite: seconds a claim protects rows; a publish gets half [60].",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Fallback poll [10 s PG, 1 s SQLite].",
)
@click.option(
    "--retention",
    type=click.FloatRange(min=0),
    default=None,
    help="Keep published rows S seconds [3600].",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics here.",
)
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
    from pigeon.outbox.relay import Relay

    box = _outbox(database_url, table, inbox_table, retention)
    relay = Relay(box, batch_size=batch_size, lease=lease, poll_interval=poll_interval)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop, signal.Signals(sig).name)
        if metrics_port is not None:
            from pigeon.metrics import serve_metrics

            try:
                serve_metrics(metrics_port, relay.ready.is_set)
            except OSError as exc:
                _fail(
                    database_url,
                    EX_CONFIG,
                    f"cannot serve metrics on port {metrics_port} "
                    f"({exc.strerror or exc}): pick a free --metrics-port",
                )
        try:
            try:
                async with asyncio.timeout(DATABASE_TIMEOUT):
                    await _check_database(database_url, box, create=create_tables, relaying=True)
            except TimeoutError:
                log.warning("outbox.database_silent", error=_SILENT)  # the relay backs off
            if create_tables and box.dialect == "sqlite":
                await box.create_tables_async()  # WAL mode
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
    """Print the pending rows of DATABASE_URL's outbox, the oldest one's age and the rows
    set aside (``failed``: no publish can carry them; see docs/outbox.md)."""
    from pigeon.outbox.relay import failed, status

    box = _outbox(database_url, table, "pigeon_inbox")

    async def run() -> tuple[int, float | None, int | None]:
        try:
            async with asyncio.timeout(DATABASE_TIMEOUT):
                await _check_database(database_url, box, create=False, relaying=False)
                return (*await status(box), await failed(box))
        except TimeoutError:
            _fail(database_url, EX_UNAVAILABLE, _SILENT)
        finally:
            await box.relay_engine().dispose()

    pending, age, set_aside = asyncio.run(run())
    click.echo(f"pending {pending}")
    click.echo(f"oldest_age_seconds {age:.3f}" if age is not None else "oldest_age_seconds -")
    click.echo(f"failed {set_aside if set_aside is not None else '-'}")
