"""engine.coalesce: group commit of concurrent calls (no database: ``send`` is a plain coroutine here)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

import pytest

from engine.coalesce import Coalescer, CoalescerClosed

MARK: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="none")


class Sender:
    """Records every batch; each batch waits for ``gate`` when one is set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.marks: list[str] = []

    async def __call__(self, items: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(items))
        self.marks.append(MARK.get())
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def test_an_item_alone_is_sent_at_once_as_a_batch_of_one() -> None:
    sender = Sender()
    c: Coalescer[int, int] = Coalescer(sender)
    assert await asyncio.wait_for(c.submit(3), 1) == 30
    assert sender.batches == [[3]]


async def test_items_of_one_turn_go_together() -> None:
    sender = Sender()
    c: Coalescer[int, int] = Coalescer(sender)
    assert await asyncio.gather(*(c.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert sender.batches == [[0, 1, 2, 3, 4]]


async def test_items_arriving_while_a_batch_is_in_flight_form_the_next_batch() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender)
    first = asyncio.ensure_future(c.submit(1))
    await sender.started.wait()
    rest = [asyncio.ensure_future(c.submit(i)) for i in range(2, 7)]
    await asyncio.sleep(0.01)
    assert c.waiting == 5 and c.in_flight == 1
    sender.gate.set()
    assert await first == 10
    assert [await r for r in rest] == [20, 30, 40, 50, 60]
    assert sender.batches == [[1], [2, 3, 4, 5, 6]]
    assert c.stats.batches == 2 and c.stats.items == 6 and c.stats.largest == 5


async def test_max_batch_splits_and_max_in_flight_sends_side_by_side() -> None:
    sender = Sender()
    c: Coalescer[int, int] = Coalescer(sender, max_batch=2)
    assert await asyncio.gather(*(c.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert sender.batches == [[0, 1], [2, 3], [4]]

    sender2 = Sender()
    sender2.gate = asyncio.Event()
    c2: Coalescer[int, int] = Coalescer(sender2, max_in_flight=2)
    a = asyncio.ensure_future(c2.submit(1))
    await sender2.started.wait()
    b = asyncio.ensure_future(c2.submit(2))
    await asyncio.sleep(0.01)
    assert c2.in_flight == 2 and len(sender2.batches) == 2  # the second did not wait for the first
    sender2.gate.set()
    assert (await a, await b) == (10, 20)


async def test_an_items_own_error_reaches_its_caller_only() -> None:
    sender = Sender()
    c: Coalescer[int, int] = Coalescer(sender)
    results = await asyncio.gather(c.submit(1), c.submit(-2), c.submit(3), return_exceptions=True)
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -2"


async def test_a_failed_send_fails_every_item_of_its_batch_and_the_next_batch_still_goes() -> None:
    calls: list[list[int]] = []

    async def send(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise ConnectionError("gone")
        return items

    c: Coalescer[int, int] = Coalescer(send)
    results = await asyncio.gather(c.submit(1), c.submit(2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await c.submit(3) == 3


async def test_a_wrong_number_of_outcomes_fails_the_batch() -> None:
    async def send(items: list[int]) -> list[int]:
        return items[:-1]

    c: Coalescer[int, int] = Coalescer(send)
    with pytest.raises(RuntimeError, match="1 outcomes for 2 items"):
        await asyncio.gather(c.submit(1), c.submit(2))


async def test_a_caller_cancelled_in_line_is_not_sent() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender)
    first = asyncio.ensure_future(c.submit(1))
    await sender.started.wait()
    leaving = asyncio.ensure_future(c.submit(2))
    staying = asyncio.ensure_future(c.submit(3))
    await asyncio.sleep(0)
    leaving.cancel()
    sender.gate.set()
    assert await first == 10 and await staying == 30
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert sender.batches == [[1], [3]]


async def test_a_caller_cancelled_during_its_send_leaves_the_others_their_results() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender)
    a = asyncio.ensure_future(c.submit(1))
    b = asyncio.ensure_future(c.submit(2))
    await sender.started.wait()
    a.cancel()
    await asyncio.sleep(0)
    sender.gate.set()
    assert await b == 20
    assert a.cancelled()


async def test_close_fails_waiting_items_and_cuts_a_hung_batch_off_within_its_bound() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()  # never set: the send hangs
    c: Coalescer[int, int] = Coalescer(sender)
    hung = asyncio.ensure_future(c.submit(1))
    await sender.started.wait()
    waiting = asyncio.ensure_future(c.submit(2))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await c.close(timeout=0.1)
    assert loop.time() - began < 2
    for f in (hung, waiting):
        with pytest.raises(CoalescerClosed):
            await f
    with pytest.raises(CoalescerClosed):
        await c.submit(3)
    assert c.in_flight == 0


async def test_an_item_submitted_as_the_sender_ends_is_still_sent() -> None:
    """Submits racing the end of a sender (the window between its last batch and leaving) are never stranded."""
    sender = Sender()
    c: Coalescer[int, int] = Coalescer(sender)
    for round_ in range(200):
        first = asyncio.ensure_future(c.submit(round_))
        for _ in range(round_ % 4):
            await asyncio.sleep(0)
        assert await asyncio.wait_for(c.submit(round_ + 1000), 1) == (round_ + 1000) * 10
        assert await first == round_ * 10
    assert c.in_flight == 0 and c.waiting == 0


async def test_the_sender_runs_in_a_fresh_context() -> None:
    sender = Sender()
    c: Coalescer[int, int] = Coalescer(sender)
    MARK.set("caller holds a connection")
    await c.submit(1)
    assert sender.marks == ["none"]


def test_bounds_are_checked() -> None:
    async def send(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="max_batch"):
        Coalescer(send, max_batch=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        Coalescer(send, max_in_flight=0)
    with pytest.raises(ValueError, match="linger"):
        Coalescer(send, linger=-0.001)
    with pytest.raises(ValueError, match="linger"):
        Coalescer(send, linger=2.0)


# ---- linger: group commit's commit_delay, under load only ------------------------------------------------------


async def test_with_a_linger_an_item_alone_is_still_sent_at_once() -> None:
    sender = Sender()
    c: Coalescer[int, int] = Coalescer(sender, linger=0.5)
    assert await asyncio.wait_for(c.submit(3), 1) == 30
    assert await asyncio.wait_for(c.submit(4), 1) == 40  # a new sender: nothing arrived in between
    assert sender.batches == [[3], [4]] and c.stats.lingers == 0


async def test_one_item_arriving_during_a_quick_send_does_not_linger() -> None:
    """A single waiting item is no sign of load, however soon after the last batch it came."""
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, linger=0.5)
    first = asyncio.ensure_future(c.submit(1))
    await sender.started.wait()
    second = asyncio.ensure_future(c.submit(2))  # one item, a few ms into a send: 1 x 0.5 s > those ms
    await asyncio.sleep(0)
    sender.gate.set()
    assert (await first, await asyncio.wait_for(second, 1)) == (10, 20)
    assert sender.batches == [[1], [2]] and c.stats.lingers == 0


async def test_under_load_the_sender_lingers_and_late_items_join_the_batch() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, linger=0.2)
    first = asyncio.ensure_future(c.submit(1))
    await sender.started.wait()
    busy = [asyncio.ensure_future(c.submit(i)) for i in range(2, 7)]  # 5 arrive at once during the send
    await asyncio.sleep(0)
    sender.gate.set()
    await first
    assert c.stats.lingers == 1  # the sender lingers (5 items in a few ms: more will come) ...
    late = [asyncio.ensure_future(c.submit(i)) for i in (7, 8)]  # ... so these join its batch
    assert [await f for f in busy + late] == [20, 30, 40, 50, 60, 70, 80]
    assert sender.batches == [[1], [2, 3, 4, 5, 6, 7, 8]]
    assert c.stats.lingers == 1


async def test_after_a_quiet_spell_the_sender_does_not_linger() -> None:
    """One item arriving during a long send is no sign of load: taken at once, not held for the linger."""
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, linger=0.05)
    first = asyncio.ensure_future(c.submit(1))
    await sender.started.wait()
    second = asyncio.ensure_future(c.submit(2))
    await asyncio.sleep(0.3)  # one item in 0.3 s: at that rate none more within 0.05 s
    sender.gate.set()
    assert (await first, await second) == (10, 20)
    assert sender.batches == [[1], [2]] and c.stats.lingers == 0


async def test_a_full_line_is_taken_without_lingering() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, max_batch=3, linger=0.5)
    first = asyncio.ensure_future(c.submit(1))
    await sender.started.wait()
    rest = [asyncio.ensure_future(c.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    sender.gate.set()
    assert [await f for f in [first, *rest]] == [10, 20, 30, 40]
    # [2, 3, 4] filled a batch: taken at once; the line was then empty
    assert sender.batches == [[1], [2, 3, 4]] and c.stats.lingers == 0


async def test_close_during_a_linger_fails_the_waiting_items_at_once() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, linger=0.9)
    first = asyncio.ensure_future(c.submit(1))
    await sender.started.wait()
    waiting = [asyncio.ensure_future(c.submit(i)) for i in range(2, 6)]
    await asyncio.sleep(0)
    sender.gate.set()
    await first
    await asyncio.sleep(0.01)
    assert c.stats.lingers == 1
    await c.close(timeout=2)
    for f in waiting:
        with pytest.raises(CoalescerClosed):
            await f
    assert c.in_flight == 0 and sender.batches == [[1]]


# -- owners take turns (fair_key) ---------------------------------------------------------------------------------


def owner(item: int) -> int:
    return item // 1000  # items 0..999 are owner 0's, 1000..1999 owner 1's, ...


async def test_with_a_fair_key_one_owners_flood_puts_no_batch_ahead_of_another_owner() -> None:
    """Owner 0 queues 250 items behind a batch in flight, then owner 1 one item: it goes in the very next batch
    (first come, first served, it would wait for three batches of 100)."""
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, max_batch=100, fair_key=owner)
    first = asyncio.ensure_future(c.submit(0))
    await sender.started.wait()
    flood = [asyncio.ensure_future(c.submit(i)) for i in range(1, 251)]
    late = asyncio.ensure_future(c.submit(1000))
    await asyncio.sleep(0)
    assert c.waiting == 251
    sender.gate.set()
    assert await late == 10_000
    assert [await f for f in flood] == [i * 10 for i in range(1, 251)] and await first == 0
    assert sender.batches[1] == [1, 1000, *range(2, 100)]  # the owners' turns alternate while both wait
    assert [len(b) for b in sender.batches] == [1, 100, 100, 51]
    assert sorted(i for b in sender.batches for i in b) == [*range(251), 1000]  # each item once, none lost


async def test_turns_carry_over_from_one_batch_to_the_next() -> None:
    """Three owners with many items each and batches of 4: every batch continues the turn order where the last
    one stopped, so over the batches each owner gets the same share."""
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, max_batch=4, fair_key=owner)
    first = asyncio.ensure_future(c.submit(9000))
    await sender.started.wait()
    items = [0 + i for i in range(1, 5)] + [1000 + i for i in range(1, 5)] + [2000 + i for i in range(1, 5)]
    waiting = [asyncio.ensure_future(c.submit(i)) for i in items]  # owner 0's arrive first, all of them
    await asyncio.sleep(0)
    sender.gate.set()
    await asyncio.gather(first, *waiting)
    assert sender.batches[1:] == [[1, 1001, 2001, 2], [1002, 2002, 3, 1003], [2003, 4, 1004, 2004]]


async def test_with_a_fair_key_a_cancelled_item_is_dropped() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, fair_key=owner)
    first = asyncio.ensure_future(c.submit(5))
    await sender.started.wait()
    leaving = asyncio.ensure_future(c.submit(6))
    staying = [asyncio.ensure_future(c.submit(i)) for i in (7, 1001)]
    await asyncio.sleep(0)
    leaving.cancel()
    sender.gate.set()
    assert await first == 50 and [await s for s in staying] == [70, 10_010]
    assert sender.batches == [[5], [1001, 7]] and c.waiting == 0


async def test_close_fails_every_owners_waiting_items() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, fair_key=owner)
    first = asyncio.ensure_future(c.submit(1))
    await sender.started.wait()
    waiting = [asyncio.ensure_future(c.submit(i)) for i in (2, 1002, 2002)]
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(c.close(timeout=1.0))
    await asyncio.sleep(0)
    for w in waiting:
        with pytest.raises(CoalescerClosed):
            await w
    assert c.waiting == 0
    sender.gate.set()
    await closing
    assert await first == 10


async def test_a_sender_cancelled_before_it_ran_frees_its_slot() -> None:
    """A sender task cancelled before its first step: its items fail (CoalescerClosed) and the next item gets a
    sender of its own (before: the slot stayed taken and every later item waited for ever)."""
    sender = Sender()
    c: Coalescer[int, int] = Coalescer(sender)
    first = asyncio.ensure_future(c.submit(1))
    await asyncio.sleep(0)  # submit ran and created the sender, which has not run yet
    assert c.in_flight == 1 and sender.batches == []
    next(iter(c._senders)).cancel()
    with pytest.raises(CoalescerClosed):
        await asyncio.wait_for(first, 1)
    assert c.in_flight == 0
    assert await asyncio.wait_for(c.submit(2), 1) == 20
    assert sender.batches == [[2]]


async def test_a_round_over_many_owners_takes_only_as_many_as_the_batch_has_room_for() -> None:
    """5,000 owners waiting with one item each, batches of 100: each batch takes the 100 owners that waited
    longest, in order, and every item goes once."""
    sender = Sender()
    sender.gate = asyncio.Event()
    c: Coalescer[int, int] = Coalescer(sender, max_batch=100, fair_key=owner)
    first = asyncio.ensure_future(c.submit(0))
    await sender.started.wait()
    items = [1000 * k for k in range(1, 5001)]
    waiting = [asyncio.ensure_future(c.submit(i)) for i in items]
    await asyncio.sleep(0)
    sender.gate.set()
    await asyncio.gather(first, *waiting)
    assert [i for b in sender.batches[1:] for i in b] == items
    assert {len(b) for b in sender.batches[1:]} == {100}
