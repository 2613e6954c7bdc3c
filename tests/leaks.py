"""The suite leaves the test broker as it found it: a check when the run ends.

Every broker name a test makes starts with a prefix from :func:`new_prefix`
(``t3f9a0c12de``), unique to this run and recorded with the test that took
it. When the run ends, the broker's queues, exchanges and virtual hosts are
listed with ``rabbitmqctl``; any name that still carries one of this run's
prefixes is a leak. Leaks are deleted (the broker is left clean either way), reported with
the test that made them, and fail the run. Names without such a prefix are
never touched: the machine's broker belongs to its user and to other runs.

A test that must use fixed names (the demo's) gets a virtual host of its own
(:func:`private_vhost`, named with a prefix too), deleted with all it holds.

The check cannot pass blind: it declares a prefixed queue of its own before
listing and fails if the listing does not show it (a wrong node, no
``rabbitmqctl``, no right to run it).

- ``PIGEON_TEST_NODE``: the node for ``rabbitmqctl -n``, when
  ``PIGEON_TEST_URL`` points at another node than the machine's
  (``scripts/rabbit-node.sh``: ``NAME@localhost``).
- ``PIGEON_TEST_LEAK_CHECK=0``: no check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import pika
import pika.exceptions

PREFIXES: dict[str, str] = {}  # prefix -> the test that took it
_SEPARATORS = (".", "-", "_")


def new_prefix(owner: str = "", head: str = "t") -> str:
    """A name prefix no other test or run uses, remembered for the end-of-run check."""
    prefix = f"{head}{uuid.uuid4().hex[:10]}"
    PREFIXES[prefix] = owner
    return prefix


def owner_of(name: str, prefixes: dict[str, str] | None = None) -> str | None:
    """The test whose prefix starts ``name`` (``""`` if it is not known), else None."""
    known = PREFIXES if prefixes is None else prefixes
    for cut in range(len(name), 0, -1):
        if cut < len(name) and name[cut] not in _SEPARATORS:
            continue
        owner = known.get(name[:cut])
        if owner is not None:
            return owner
    return None


@dataclass
class Report:
    """What the check found: leaked names by kind, or why it could not look."""

    error: str = ""
    queues: dict[str, str] = field(default_factory=dict)  # name -> owner
    exchanges: dict[str, str] = field(default_factory=dict)
    vhosts: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.error or self.queues or self.exchanges or self.vhosts)

    def lines(self) -> list[str]:
        if self.error:
            return [f"broker leak check could not run: {self.error}"]
        out = []
        kinds = (("queue", self.queues), ("exchange", self.exchanges), ("vhost", self.vhosts))
        for kind, names in kinds:
            for name, owner in sorted(names.items()):
                out.append(f"leaked {kind} {name} (from {owner or 'an unknown test'}); deleted")
        return out


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


_RABBITMQCTL = shutil.which(
    "rabbitmqctl", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
)


def _ctl_command(*args: str) -> list[str]:
    node = os.environ.get("PIGEON_TEST_NODE")
    return [_RABBITMQCTL or "rabbitmqctl", "-q", *(["-n", node] if node else []), *args]


def ctl(*args: str) -> str:
    """``rabbitmqctl ARGS`` on the test broker's node (``PIGEON_TEST_NODE``); its output."""
    done = subprocess.run(_ctl_command(*args), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def _list(*commands: list[str]) -> list[list[str]]:
    """Each ``rabbitmqctl`` listing (run side by side): the names it printed."""
    procs = [
        subprocess.Popen(
            _ctl_command(*command, "--no-table-headers", "name"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    outputs = [(proc, *proc.communicate(timeout=120)) for proc in procs]
    for proc, _, err in outputs:
        if proc.returncode != 0:
            raise RuntimeError(f"{proc.args!r} failed: {err.strip()[-500:]}")
    return [[line.strip() for line in out.splitlines() if line.strip()] for _, out, _ in outputs]


@contextlib.contextmanager
def private_vhost(url: str, owner: str) -> Iterator[str]:
    """A new virtual host on the test broker, for a test that must use fixed names (the
    demo's ``pigeon.events`` ...): the URL of ``url``'s user on it. Deleting the vhost
    at the end deletes everything in it."""
    name = new_prefix(owner)
    parts = urlsplit(url)
    ctl("add_vhost", name)
    try:
        ctl("set_permissions", "-p", name, unquote(parts.username or "guest"), ".*", ".*", ".*")
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        ctl("delete_vhost", name)


def _delete(url: str, queues: Iterable[str], exchanges: Iterable[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for method, names in (("queue_delete", queues), ("exchange_delete", exchanges)):
            for name in names:
                with contextlib.suppress(pika.exceptions.ChannelClosed):
                    channel = connection.channel()
                    getattr(channel, method)(name)
                    channel.close()
    finally:
        connection.close()


def check(url: str, prefixes: dict[str, str] | None = None) -> Report:
    """List the broker; delete and report what carries one of ``prefixes`` (this run's)."""
    known = PREFIXES if prefixes is None else prefixes
    if _RABBITMQCTL is None:
        return Report(error="rabbitmqctl is not installed (PIGEON_TEST_LEAK_CHECK=0 skips this)")
    sentinel_prefix = new_prefix("the leak check itself")
    known[sentinel_prefix] = "the leak check itself"
    sentinel = f"{sentinel_prefix}.leak-check"
    try:
        _declare(url, sentinel)
        vhost = ["-p", _vhost(url)]
        queues, exchanges, vhosts = _list(
            ["list_queues", *vhost], ["list_exchanges", *vhost], ["list_vhosts"]
        )
    except Exception as error:  # reported: nothing may raise at the end of a run
        return Report(error=f"{error} (set PIGEON_TEST_NODE, or PIGEON_TEST_LEAK_CHECK=0)")
    finally:
        with contextlib.suppress(Exception):
            _delete(url, [sentinel], [])
    if sentinel not in queues or owner_of(sentinel, known) is None:
        node = os.environ.get("PIGEON_TEST_NODE", "rabbitmqctl's default node")
        return Report(
            error=f"{node} does not list {sentinel}, just declared at {mask(url)}: "
            "set PIGEON_TEST_NODE to the node behind PIGEON_TEST_URL"
        )
    report = Report(
        queues={q: o for q in queues if q != sentinel and (o := owner_of(q, known)) is not None},
        exchanges={x: o for x in exchanges if (o := owner_of(x, known)) is not None},
        vhosts={v: o for v in vhosts if (o := owner_of(v, known)) is not None},
    )
    if report.queues or report.exchanges:
        _delete(url, report.queues, report.exchanges)
    for name in report.vhosts:
        with contextlib.suppress(RuntimeError):
            ctl("delete_vhost", name)
    return report


def mask(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url


def _declare(url: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(queue, durable=False, auto_delete=False)
    finally:
        connection.close()


def enabled() -> bool:
    """Whether the check runs: on by default, off with ``PIGEON_TEST_LEAK_CHECK=0``,
    and only for a run whose tests took a prefix (one that used the broker)."""
    return os.environ.get("PIGEON_TEST_LEAK_CHECK", "1") != "0" and bool(PREFIXES)
