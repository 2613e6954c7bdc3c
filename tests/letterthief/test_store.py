"""The store, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from letterthief.models import Letter, Status
from letterthief.queries import BadCursor, Filters
from letterthief.store import Store
from tests.letterthief.conftest import received


async def test_a_stored_letter_keeps_everything_it_arrived_with(store: Store) -> None:
    r = received("m-1", body=b'{"order_id": "o-7"}', correlation_id="c-1")
    (stored,) = await store.ingest([r])
    letter = await store.get(stored.letter_id)
    assert letter is not None
    assert letter.message_id == "m-1"
    assert letter.queue == "billing.charge-card"
    assert letter.event == "order.placed"
    assert letter.service == "billing"
    assert letter.reason == "handler-error"
    assert letter.exception_type == "ValueError"
    assert letter.exception_message == "no partner for region"
    assert letter.traceback.startswith("Traceback")
    assert letter.attempts == 3
    assert letter.body == b'{"order_id": "o-7"}'
    assert letter.headers["x-pigeon-queue"] == "billing.charge-card"
    assert letter.properties["correlation_id"] == "c-1"
    assert letter.status == Status.OPEN
    assert letter.occurrences == 1
    assert letter.first_seen_at.tzinfo is not None


async def test_the_same_message_failing_again_adds_an_occurrence_and_reopens(
    store: Store,
) -> None:
    (first,) = await store.ingest([received("m-2")])
    await store.set_status([first.letter_id], Status.ARCHIVED, "ops")
    (again,) = await store.ingest([received("m-2", exception_message="partner timed out")])
    assert again.letter_id == first.letter_id
    detail = await store.detail(first.letter_id)
    assert detail is not None
    assert detail.letter.occurrences == 2
    assert detail.letter.status == Status.OPEN
    assert detail.letter.exception_message == "partner timed out"
    assert [o.exception_message for o in detail.occurrences] == [
        "partner timed out",
        "no partner for region",
    ]


async def test_one_batch_with_the_same_message_twice_makes_one_letter(store: Store) -> None:
    stored = await store.ingest([received("m-3"), received("m-3"), received("m-4")])
    assert len({s.letter_id for s in stored}) == 2
    page = await store.page(Filters())
    assert sorted((i.message_id, i.occurrences) for i in page.items) == [("m-3", 2), ("m-4", 1)]


async def test_the_same_message_id_in_another_queue_is_another_letter(store: Store) -> None:
    await store.ingest([received("m-5", queue="a.x"), received("m-5", queue="b.y")])
    assert (await store.page(Filters())).total == 2


async def test_a_redelivered_copy_of_a_stored_occurrence_is_not_counted_twice(
    store: Store,
) -> None:
    r = received("m-6")
    (stored,) = await store.ingest([r])
    r.redelivered = True
    assert await store.ingest([r]) == []
    letter = await store.get(stored.letter_id)
    assert letter is not None
    assert letter.occurrences == 1


async def test_filters_narrow_the_list_and_the_total(store: Store) -> None:
    await store.ingest(
        [
            received("a", queue="billing.charge", event="order.placed"),
            received("b", queue="billing.charge", event="order.cancelled"),
            received("c", queue="mail.send", exception_type="KeyError"),
            received("d", queue="mail.send", reason="invalid-payload", body=b'{"sku": "XZ-99"}'),
        ]
    )
    assert (await store.page(Filters(queue="billing.charge"))).total == 2
    assert (await store.page(Filters(event="order.cancelled"))).total == 1
    assert (await store.page(Filters(service="mail"))).total == 2
    assert (await store.page(Filters(exception_type="KeyError"))).total == 1
    assert (await store.page(Filters(reason="invalid-payload"))).total == 1
    assert [i.message_id for i in (await store.page(Filters(q="xz-99"))).items] == ["d"]
    assert (await store.page(Filters(q="PARTNER"))).total == 4
    assert (await store.page(Filters(q="100%_"))).total == 0
    future = datetime.now(UTC) + timedelta(hours=1)
    assert (await store.page(Filters(since=future))).total == 0
    assert (await store.page(Filters(until=future))).total == 4


async def test_keyset_pages_walk_every_letter_once_newest_first(store: Store) -> None:
    for i in range(7):
        await store.ingest([received(f"p-{i}")])
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.page(Filters(), limit=3, cursor=cursor)
        assert page.total == 7
        seen += [i.message_id for i in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [f"p-{i}" for i in reversed(range(7))]
    with pytest.raises(BadCursor):
        await store.page(Filters(), cursor="garbage!")


async def test_groups_count_open_letters_per_queue_and_exception(store: Store) -> None:
    await store.ingest(
        [received(f"g-{i}") for i in range(3)]
        + [received("k-1", exception_type="KeyError", exception_message="'sku'")]
    )
    groups = await store.groups()
    by_type = {g.exception_type: g for g in groups}
    assert by_type["ValueError"].count == 3
    assert by_type["ValueError"].queue == "billing.charge-card"
    assert by_type["ValueError"].event == "order.placed"
    assert by_type["KeyError"].exception_message == "'sku'"
    assert by_type["KeyError"].first_seen_at <= by_type["KeyError"].last_seen_at


async def test_retried_letters_record_who_and_stay_open_if_they_already_came_back(
    store: Store,
) -> None:
    a, b = await store.ingest([received("r-1"), received("r-2")])
    await store.ingest([received("r-2")])  # failed again before the confirm was recorded
    await store.mark_retried([(a.letter_id, 1), (b.letter_id, 1)], "ops")
    first, second = await store.get_many([a.letter_id, b.letter_id])
    assert first.status == Status.RETRIED
    assert first.last_retried_at is not None
    assert second.status == Status.OPEN
    detail = await store.detail(a.letter_id)
    assert detail is not None
    assert [(x.actor, x.action, x.result) for x in detail.actions] == [("ops", "retry", "ok")]


async def test_archive_and_restore_change_only_letters_in_the_right_state(store: Store) -> None:
    a, b = await store.ingest([received("s-1"), received("s-2")])
    assert await store.set_status([a.letter_id], Status.ARCHIVED, "ops") == [a.letter_id]
    assert await store.set_status([a.letter_id], Status.ARCHIVED, "ops") == []
    assert await store.set_status([a.letter_id, b.letter_id], Status.OPEN, "ops") == [a.letter_id]
    assert (await store.status_totals())["open"] == 2


async def test_retention_purges_old_archived_and_retried_letters_but_never_open_ones(
    store: Store,
) -> None:
    _old_open, old_archived, old_retried, new_archived = await store.ingest(
        [received("o-1"), received("o-2"), received("o-3"), received("o-4")]
    )
    await store.set_status([old_archived.letter_id, new_archived.letter_id], Status.ARCHIVED, "x")
    await store.mark_retried([(old_retried.letter_id, 1)], "x")
    long_ago = datetime.now(UTC) - timedelta(days=40)
    async with store.sessions() as session, session.begin():
        await session.execute(
            update(Letter)
            .where(Letter.id != new_archived.letter_id)
            .values(status_changed_at=long_ago, last_seen_at=long_ago)
        )
    assert await store.purge(timedelta(days=30)) == 2
    left = {i.message_id for i in (await store.page(Filters())).items}
    assert left == {"o-1", "o-4"}


async def test_letters_of_one_conversation_are_linked(store: Store) -> None:
    a, _b, _c = await store.ingest(
        [
            received("v-1", correlation_id="order-42"),
            received("v-2", queue="mail.send", correlation_id="order-42"),
            received("v-3", correlation_id="other"),
        ]
    )
    detail = await store.detail(a.letter_id)
    assert detail is not None
    assert [x.message_id for x in detail.conversation] == ["v-2"]


async def test_opening_twice_applies_migrations_once(database_url: str) -> None:
    async with Store(database_url) as first:
        await first.ingest([received("twice")])
    async with Store(database_url) as second:
        assert (await second.page(Filters())).total == 1


async def test_binary_bodies_and_nul_characters_are_stored(store: Store) -> None:
    body = b"\x00\x01\xffbinary\x00"
    r = received("bin-1", body=body, exception_message="bad byte \x00 here")
    r.headers["x-raw"] = {"$bytes": "AAE="}
    (stored,) = await store.ingest([r])
    letter = await store.get(stored.letter_id)
    assert letter is not None
    assert letter.body == body
    assert letter.exception_message == "bad byte \ufffd here"
