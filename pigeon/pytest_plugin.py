"""pytest fixtures for services built on Pigeon (registered through the ``pytest11`` entry point).

- ``pigeon_fake``: a :class:`pigeon.testing.FakeBus` capturing every dispatch of the test.
- ``pigeon_app``: a ``Pigeon(service="test")`` with in-memory idempotency whose
  dispatches are captured, for tests that build listeners inline.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pigeon.app import Pigeon
from pigeon.settings import Settings
from pigeon.testing import FakeBus, fake


@pytest.fixture
def pigeon_fake() -> Iterator[FakeBus]:
    with fake() as bus:
        yield bus


@pytest.fixture
def pigeon_app(pigeon_fake: FakeBus) -> Pigeon:
    return Pigeon(service="test", settings=Settings(idempotency_url="memory://"))
