"""The connect timeout of the engine an outbox makes from a URL (pure, no database).

The silent database itself: tests/test_attack_outbox.py."""

from __future__ import annotations

import pytest

from pigeon.outbox.tables import CONNECT_TIMEOUT, connect_args


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app@db/shop", {"connect_timeout": CONNECT_TIMEOUT}),
        ("postgresql+psycopg://app@db/shop", {"connect_timeout": CONNECT_TIMEOUT}),
        ("postgresql+asyncpg://app@db/shop", {"timeout": CONNECT_TIMEOUT}),
        ("sqlite:///shop.db", {}),
    ],
)
def test_each_postgres_driver_gets_a_bounded_connect(url: str, expected: dict[str, int]) -> None:
    assert connect_args(url) == expected


def test_a_connect_timeout_in_the_url_wins() -> None:
    """connect_args override the URL's query: a slow link's ?connect_timeout=30 became 10."""
    assert connect_args("postgresql+psycopg://app@db/shop?connect_timeout=30") == {}
