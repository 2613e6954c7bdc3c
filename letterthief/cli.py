"""``letterthief``: serve the collector, UI and API, or work with letters from a shell.

Configuration comes from ``LETTERTHIEF_*`` and ``PIGEON_*`` variables (see
``docs/letterthief.md``). ``list``/``show``/``archive``/``restore`` only need
the database; ``retry`` also publishes to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import click
import uvicorn

from letterthief import api, parse
from letterthief.models import Status
from letterthief.queries import Filters
from letterthief.replay import ReplayError
from letterthief.service import LetterThief
from letterthief.settings import LetterThiefSettings, is_loopback
from letterthief.store import StoreUnavailable
from pigeon.errors import SettingsError
from pigeon.logs import configure_logging, get_logger
from pigeon.settings import Settings, mask_url

T = TypeVar("T")
EX_CONFIG = 78
log = get_logger("letterthief")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _run(work: Callable[[LetterThief], Awaitable[T]], *, quiet: bool = True) -> T:
    """Open the store (no collector), run ``work``, close everything."""
    pigeon = Settings()
    configure_logging(pigeon.log_format, "WARNING" if quiet else pigeon.log_level)
    settings = LetterThiefSettings()
    click.echo(f"letterthief: database {mask_url(settings.database_url)}", err=True)
    try:
        thief = LetterThief(settings, pigeon)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc

    async def go() -> T:
        try:
            await thief.open()
            return await work(thief)
        finally:
            await thief.stop()

    try:
        return asyncio.run(go())
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="pigeon-bus", prog_name="letterthief")
def main() -> None:
    """LetterThief: every dead letter stored, shown, alerted and replayable."""
    try:
        Settings()
        LetterThiefSettings()
    except SettingsError as exc:
        click.echo(f"letterthief: {exc}", err=True)
        sys.exit(EX_CONFIG)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind")
@click.option("--port", default=8025, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Run the collector, the web UI, the JSON API and the Slack alerter."""
    settings = LetterThiefSettings()
    pigeon = Settings()
    if not is_loopback(host) and not settings.has_login:
        raise click.UsageError(
            f"refusing to serve on {host} without credentials: anyone who can reach it could "
            "read and replay every dead letter. Set LETTERTHIEF_USERNAME and "
            "LETTERTHIEF_PASSWORD (and LETTERTHIEF_API_TOKEN for scripts), or serve on "
            "--host 127.0.0.1."
        )
    configure_logging(pigeon.log_format, pigeon.log_level)
    listening = _bind(host, port)
    try:
        asyncio.run(_serve(settings, pigeon, listening))
    except ValueError as exc:  # StoreUnavailable included
        raise click.ClickException(str(exc)) from None


def _bind(host: str, port: int) -> socket.socket:
    """The web port, bound before anything starts: a taken port is one line and exit 1,
    not a crash after "serving" was logged."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(
            f"cannot serve on {host}:{port} ({exc.strerror or exc}): pick a free --port"
        ) from None
    sock.listen(128)
    return sock


async def _serve(settings: LetterThiefSettings, pigeon: Settings, listening: socket.socket) -> None:
    from letterthief.web import create_app

    host, port = listening.getsockname()[:2]

    thief = LetterThief(settings, pigeon)
    await thief.start()
    config = uvicorn.Config(
        create_app(thief),
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
    )
    log.info(
        "letterthief.serving",
        url=f"http://{host}:{port}",
        database=mask_url(settings.database_url),
        broker=mask_url(pigeon.url),
        dead_letter_queue=pigeon.dead_letter_queue,
        login=settings.has_login,
        slack=bool(settings.webhook),
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_exit, sig)
    try:
        await server.serve(sockets=[listening])
    finally:
        await thief.stop()
        log.info("letterthief.stopped")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: it re-raises SIGTERM after shutdown,
    which would kill the process before the collector and the database are closed."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_exit(self, sig: int) -> None:
        self.should_exit = True  # before logging: a broken stderr must not keep us running
        with contextlib.suppress(Exception):
            log.info("letterthief.stopping", signal=signal.Signals(sig).name)


def _status(value: str | None) -> str | None:
    return None if value in (None, "any") else value


@main.command("list")
@click.option("--queue", help="only this original queue")
@click.option("--status", type=click.Choice(["open", "retrying", "retried", "archived", "any"]), default="open",
              show_default=True)  # fmt: skip
@click.option("--event", help="only this event name")
@click.option("--search", "q", help="text in the message id, exception message or body")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 500))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def list_letters(
    queue: str | None, status: str, event: str | None, q: str | None, limit: int, as_json: bool
) -> None:
    """List letters, newest failure first."""
    filters = Filters(queue=queue, status=_status(status), event=event, q=q)
    page = _run(lambda thief: thief.store.page(filters, limit=limit))
    if as_json:
        for letter in page.items:
            click.echo(json.dumps(api.item(letter)))
        return
    click.echo(
        f"{page.total} letter(s)" + (f", showing {len(page.items)}" if page.total > limit else "")
    )
    for x in page.items:
        what = x.exception_type or x.reason
        message = " ".join(x.exception_message.split())[:80]
        click.echo(
            f"{x.id:>7}  {x.status:<8} {x.last_seen_at:%Y-%m-%d %H:%M:%S}  {x.queue}  "
            f"{x.event}  x{x.occurrences}  {what}: {message}"
        )


@main.command()
@click.argument("letter_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="the API's JSON detail")
def show(letter_id: int, as_json: bool) -> None:
    """Show one letter: metadata, exception, body, traceback, history."""
    detail = _run(lambda thief: thief.store.detail(letter_id))
    if detail is None:
        raise click.ClickException(f"there is no letter {letter_id}")
    if as_json:
        click.echo(json.dumps(api.detail(detail), indent=2))
        return
    x = detail.letter
    rows: list[tuple[str, Any]] = [
        ("letter", x.id), ("status", x.status), ("message id", x.message_id),
        ("event", x.event), ("service", x.service), ("queue", x.queue),
        ("exchange", x.exchange or "(default)"), ("routing key", x.routing_key),
        ("reason", x.reason), ("attempts", x.attempts), ("occurrences", x.occurrences),
        ("correlation id", x.correlation_id), ("first seen", x.first_seen_at),
        ("last seen", x.last_seen_at), ("last retried", x.last_retried_at),
        ("exception", f"{x.exception_type}: {x.exception_message}"),
    ]  # fmt: skip
    for name, value in rows:
        click.echo(f"{name:>15}  {value if value is not None else '-'}")
    kind, body = parse.body_view(x.body, x.content_type)
    click.echo(f"\nbody ({kind}, {len(x.body)} bytes):\n{body}")
    if x.traceback:
        click.echo(f"\n{x.traceback}")
    for a in detail.actions:
        click.echo(f"{a.at:%Y-%m-%d %H:%M:%S}  {a.actor}  {a.action}  {a.result}  {a.detail}")


@main.command()
@click.argument("ids", type=int, nargs=-1)
@click.option("--queue", help="retry every open letter of this original queue")
def retry(ids: tuple[int, ...], queue: str | None) -> None:
    """Publish letters back to their original queue (by ID, or all open ones of --queue)."""
    if bool(ids) == bool(queue):
        raise click.UsageError("give letter IDs or --queue QUEUE (not both)")
    actor = _actor()

    async def work(thief: LetterThief) -> int:
        if ids and len(ids) == 1:
            try:
                await thief.replayer.retry(ids[0], actor)
            except ReplayError as exc:
                click.echo(f"letter {ids[0]}: {exc}", err=True)
                return 1
            click.echo(f"letter {ids[0]}: sent back to its queue")
            return 0
        targets = list(ids) or await thief.store.ids(Filters(queue=queue, status="open"))
        job = thief.jobs.new("retry", actor, len(targets))
        await thief.replayer.retry_many(targets, actor, job)
        click.echo(f"{job.done} sent, {job.failed} failed, {job.skipped} skipped (not open)")
        for letter_id, error in list(job.errors.items())[:20]:
            click.echo(f"letter {letter_id}: {error}", err=True)
        return 1 if job.failed else 0

    sys.exit(_run(work))


def _set_status(ids: tuple[int, ...], status: Status, verb: str) -> None:
    actor = _actor()
    changed = _run(lambda thief: thief.store.set_status(list(ids), status, actor))
    click.echo(f"{verb} {len(changed)} of {len(ids)} letter(s)")
    if len(changed) < len(ids):
        skipped = sorted(set(ids) - set(changed))
        click.echo(f"unchanged (missing or already {status.value}): {skipped}", err=True)


@main.command()
@click.argument("ids", type=int, nargs=-1, required=True)
def archive(ids: tuple[int, ...]) -> None:
    """Archive letters: handled, nothing to retry (purged after the retention)."""
    _set_status(ids, Status.ARCHIVED, "archived")


@main.command()
@click.argument("ids", type=int, nargs=-1, required=True)
def restore(ids: tuple[int, ...]) -> None:
    """Reopen archived or retried letters."""
    _set_status(ids, Status.OPEN, "restored")
