"""Which frames the Acker writes: coalesced where that is safe, never covering a tag it must not."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from pigeon.acks import Acker


def acker(*tags: int) -> Acker:
    a = Acker(cast(AbstractChannel, SimpleNamespace(is_closed=False, number=1)), "svc.q")
    for tag in tags:
        a.delivered(tag)
    return a


def described(frames: list[Any]) -> list[tuple[str, int, bool]]:
    out = []
    for frame in frames:
        if isinstance(frame, Basic.Ack):
            out.append(("ack", frame.delivery_tag, frame.multiple))
        else:
            assert isinstance(frame, Basic.Nack)
            assert frame.requeue
            out.append(("give back", frame.delivery_tag, frame.multiple))
    return out


async def test_a_run_of_acks_from_the_lowest_unsettled_tag_is_one_multiple_ack() -> None:
    a = acker(1, 2, 3, 4)
    for tag in (3, 1, 2, 4):
        a.ack(tag)
    frames, count = a.frames()
    assert described(frames) == [("ack", 4, True)]
    assert count == 4
    assert a.unsettled == 0


async def test_a_message_still_in_progress_ends_the_run() -> None:
    a = acker(1, 2, 3, 4, 5)
    for tag in (1, 2, 4, 5):  # 3 is still being handled
        a.ack(tag)
    frames, count = a.frames()
    assert described(frames) == [("ack", 2, True), ("ack", 4, False), ("ack", 5, False)]
    assert count == 4
    assert a.unsettled == 1
    a.ack(3)  # now 3 is the lowest unsettled tag, and alone
    assert described(a.frames()[0]) == [("ack", 3, False)]


async def test_a_given_back_message_is_never_covered_by_a_multiple_ack() -> None:
    a = acker(1, 2, 3, 4)
    a.ack(1)
    a.ack(2)
    a.give_back(3)
    a.ack(4)
    frames, _ = a.frames()
    assert described(frames) == [("ack", 2, True), ("give back", 3, False), ("ack", 4, False)]


async def test_a_lone_ack_is_sent_on_its_own() -> None:
    a = acker(1, 2)
    a.ack(2)
    assert described(a.frames()[0]) == [("ack", 2, False)]


async def test_settling_twice_or_settling_an_unknown_tag_sends_nothing_more() -> None:
    a = acker(1)
    a.ack(1)
    a.give_back(1)
    a.ack(99)  # delivered on an earlier channel: its tag means nothing on this one
    frames, count = a.frames()
    assert described(frames) == [("ack", 1, False)]
    assert count == 1
    a.ack(1)
    assert a.frames() == ([], 0)
