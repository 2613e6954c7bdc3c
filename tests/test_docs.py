"""Every Python and shell block of README.md and docs/*.md runs as written (Sybil).

Each document runs in order, in a directory of its own, against the real
broker with this test's unique exchanges (``PIGEON_*``), so one block can
use what an earlier one defined. Conventions (docs/testing.md, "Samples in
the docs"):

- A Python block whose first line is ``# name.py`` is a file of the sample
  app: it is written to ``name.py`` and imported, so later blocks and
  commands (``pigeon listen name:app``) find it.
- Top-level ``await`` works in a Python block.
- A shell block (``bash``/``sh``) runs with ``bash -e`` in that directory with
  ``.venv/bin`` first on ``PATH``; jobs it leaves in the background are
  stopped after it.
- ``<!-- skip: next -->`` before a block marks it a fragment (it refers to
  code the page does not show, or needs Docker, a demo, a cluster...): the
  collector skips it. Other fenced languages (json, yaml, text) are not run.

New files in docs/ are collected without registering them anywhere.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import inspect
import os
import re
import signal
import subprocess
import sys
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from sybil import Document, Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser
from sybil.typing import Parser

import pigeon.app
import pigeon.events
from tests import leaks
from tests.conftest import AMQP_URL, settings_env, unique_settings

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RUN = ("python", "bash", "sh")
NOT_RUN = ("json", "yaml", "toml", "text", "")
FILE_BLOCK = re.compile(r"#\s*([A-Za-z_][\w]*)\.py\b")
SHELL_TIMEOUT = 120
BROKER_COMMANDS = ("pigeon listen", "pigeon topology declare", "letterthief serve")


def _python(example: Example) -> None:
    namespace = example.namespace
    source: str = example.parsed
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    found = FILE_BLOCK.match(first)
    if found:
        name = found.group(1)
        (namespace["__docdir__"] / f"{name}.py").write_text(source)
        sys.modules.pop(name, None)
        importlib.invalidate_caches()  # the file is newer than the finder's directory listing
        module = importlib.import_module(name)
        namespace["__modules__"].append(name)
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return
    code = compile(
        "\n" * (example.line) + source,
        str(example.path),
        "exec",
        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
    )
    if code.co_flags & inspect.CO_COROUTINE:
        asyncio.run(eval(code, namespace))
    else:
        exec(code, namespace)


def _shell(example: Example) -> None:
    namespace = example.namespace
    if any(command in example.parsed for command in BROKER_COMMANDS):
        _refuse_foreign_queues(namespace)
    process = subprocess.Popen(
        ["bash", "-e", "-c", example.parsed],
        cwd=namespace["__docdir__"],
        env=namespace["__env__"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=SHELL_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait()
    if os.environ.get("DOCS_SHOW"):
        print(output)
    if process.returncode != 0:
        raise AssertionError(
            f"{example.path}:{example.line}: the block exited {process.returncode}:\n{output}"
        )


PARSERS: list[Parser] = [
    SkipParser(),
    CodeBlockParser("python", _python),
    *(CodeBlockParser(language, _shell) for language in ("bash", "sh")),
]
SYBIL = Sybil(parsers=PARSERS)


# -- the broker: this test's names only ------------------------------------------------


def _queues_of_doc_apps(namespace: dict[str, Any]) -> set[str]:
    settings = namespace["__settings__"]
    names: set[str] = set()
    for app in list(pigeon.app._apps):
        if app.settings.exchange == settings.exchange:
            names |= {queue.name for queue in app.topology().queues}
    return names - {settings.unrouted_queue, settings.dead_letter_queue}


def _exists(channel_holder: list[Any], connection: Any, queue: str) -> bool:
    try:
        channel_holder[0].queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        channel_holder[0] = connection.channel()
        return False


def _refuse_foreign_queues(namespace: dict[str, Any]) -> None:
    """A sample app's queue that exists already belongs to someone else (the demo): skip
    rather than consume or delete its messages. Queues found missing are ours to delete."""
    wanted = _queues_of_doc_apps(namespace) - namespace["__ours__"]
    if not wanted:
        return
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        holder = [connection.channel()]
        taken = sorted(queue for queue in wanted if _exists(holder, connection, queue))
    finally:
        connection.close()
    if taken:
        pytest.skip(f"queues {', '.join(taken)} exist already (the demo?); not sharing them")
    namespace["__ours__"] |= wanted


def _clean_broker(namespace: dict[str, Any]) -> None:
    settings = namespace["__settings__"]
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        queues = {settings.unrouted_queue, settings.dead_letter_queue, *namespace["__ours__"]}
        for queue in sorted(queues):
            try:
                channel.queue_delete(queue)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
        for exchange in (
            settings.exchange,
            settings.unrouted_exchange,
            settings.dead_letter_exchange,
        ):
            try:
                channel.exchange_delete(exchange)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
    finally:
        connection.close()


# -- one document -----------------------------------------------------------------------


@pytest.fixture
def doc_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """The environment a reader would have: an empty directory, the broker, this test's names."""
    settings = unique_settings(leaks.new_prefix(request.node.nodeid, head="doc"))
    env = settings_env(settings)
    env.pop("PIGEON_LOG_FORMAT", None)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(tmp_path),
            "LETTERTHIEF_DATABASE_URL": f"sqlite:///{tmp_path / 'letterthief.db'}",
        }
    )
    for key in [k for k in os.environ if k.startswith(("PIGEON_", "LETTERTHIEF_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("PIGEON_", "LETTERTHIEF_")):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = dict(pigeon.events._registry)
    pigeon.events._registry.clear()  # each page stands alone, as it does for a reader
    pigeon.app.set_default_app(None)
    namespace: dict[str, Any] = {
        "__name__": "__doc__",
        "__docdir__": tmp_path,
        "__env__": env,
        "__settings__": settings,
        "__modules__": [],
        "__ours__": set(),
    }
    try:
        yield namespace
    finally:
        pigeon.app.set_default_app(None)
        for name in namespace["__modules__"]:
            sys.modules.pop(name, None)
        pigeon.events._registry.clear()
        pigeon.events._registry.update(registry)
        _clean_broker(namespace)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_samples_run_as_written(path: Path, doc_namespace: dict[str, Any]) -> None:
    document: Document = SYBIL.parse(path)
    document.namespace.update(doc_namespace)
    for example in document.examples():
        try:
            example.evaluate()
        except unittest.SkipTest:  # ``skip: next "why"``: a fragment, on purpose
            continue


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_is_run_or_plainly_not_code(path: Path) -> None:
    """A block in another spelling (``py``, ``shell``, ``console``) would escape the run."""
    fences = re.findall(r"^```(\S*)", path.read_text(), flags=re.MULTILINE)
    languages = set(fences[0::2])  # every other fence opens a block
    assert languages <= {*RUN, *NOT_RUN}, f"{path.name}: {sorted(languages - {*RUN, *NOT_RUN})}"
