"""pytest fixtures for services built on Pigeon (registered through the ``pytest11`` entry point).

- ``pigeon_fake``: a :class:`pigeon.testing.FakeBus` capturing every dispatch of the test.
- ``pigeon_app``: a ``Pigeon(service="test")`` with in-memory idempotency whose
  dispatches are captured, for tests that build listeners inline.

Handlers and ``deliver()`` are async, so the tests that drive them are too:
with pytest-asyncio installed (the ``[testing]`` extra brings it) and no
``asyncio_mode`` configured, this plugin selects ``auto``, so ``async def
test_...`` runs without a marker. A project that sets ``asyncio_mode``
itself (ini file or ``--asyncio-mode``) keeps its choice.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pigeon.app import Pigeon
from pigeon.settings import Settings
from pigeon.testing import FakeBus, fake


def pytest_configure(config: pytest.Config) -> None:
    options = config.option
    if not hasattr(options, "asyncio_mode") or options.asyncio_mode is not None:
        return
    inipath = config.inipath
    if inipath is not None and "asyncio_mode" in inipath.read_text(errors="replace"):
        return
    options.asyncio_mode = "auto"


@pytest.fixture
def pigeon_fake() -> Iterator[FakeBus]:
    with fake() as bus:
        yield bus


@pytest.fixture
def pigeon_app(pigeon_fake: FakeBus) -> Pigeon:
    return Pigeon(service="test", settings=Settings(idempotency_url="memory://"))
