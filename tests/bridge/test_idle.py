"""Idle deadlines on their own, on trio's autojump clock with exact virtual times.

A reader's scope is cancelled exactly one period after its last message, as a deadline
pushed forward by each message would be; a stopped deadline never fires; and the one
watcher task of an ``IdleWatch`` lives only while a reader is watched.
"""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from voicebridge.bridge.idle import IdleWatch

#: The readers' period, unless a test gives another.
PERIOD_S = 3.0
#: How long after a reader begins the tasks in the nursery are counted.
COUNT_AFTER_S = 0.25


@attrs.frozen
class Ending:
    """How a reader ended: when, and whether its idle deadline cancelled it."""

    at: float
    idle: bool


@attrs.frozen(kw_only=True)
class Reader:
    """One reader of a test. Times are seconds after the test began: when it begins
    (at least ``COUNT_AFTER_S`` after the reader before it) and when a message comes
    to it, ``last`` being the last one's text if given (``stop`` stops its deadline,
    ``leave`` leaves its block); then it waits ``after_s`` more within its scope."""

    begins: float = 0.0
    period_s: float = PERIOD_S
    messages: tuple[float, ...] = ()
    last: str = ""
    after_s: float = 0.0


@attrs.frozen
class Run:
    """How each reader ended, when the nursery holding them and the watcher closed,
    and how many tasks that nursery had ``COUNT_AFTER_S`` after each reader began."""

    endings: list[Ending]
    closed_at: float
    tasks: list[int]


async def read(idle: IdleWatch, inbox: trio.MemoryReceiveChannel[str], reader: Reader) -> Ending:
    """Read ``inbox`` under an idle deadline, each message marking activity."""
    with trio.CancelScope() as scope:
        with idle.watch(scope, reader.period_s) as deadline:
            async for message in inbox:
                deadline.touch()
                if message == "stop":
                    deadline.stop()
                    break
                if message == "leave":
                    break
        await trio.sleep(reader.after_s)
    return Ending(at=trio.current_time(), idle=scope.cancelled_caught)


async def send_at(inbox: trio.MemorySendChannel[str], times: list[float], last: str) -> None:
    """A message at each of ``times`` (``last`` as the last one, if given); the channel
    stays open."""
    for i, at in enumerate(times):
        await trio.sleep_until(at)
        await inbox.send(last if last and i == len(times) - 1 else "message")


async def run_readers(*readers: Reader) -> Run:
    """Run ``readers`` on one ``IdleWatch``, each fed its messages."""
    t0 = trio.current_time()
    endings: dict[int, Ending] = {}
    tasks: list[int] = []

    async def run(i: int, inbox: trio.MemoryReceiveChannel[str]) -> None:
        endings[i] = await read(idle, inbox, readers[i])

    with trio.fail_after(600):
        async with trio.open_nursery() as feeder:
            async with trio.open_nursery() as nursery:
                idle = IdleWatch(nursery)
                for i, reader in enumerate(readers):
                    send, receive = trio.open_memory_channel[str](0)
                    times = [t0 + at for at in reader.messages]
                    feeder.start_soon(send_at, send, times, reader.last)
                    await trio.sleep_until(t0 + reader.begins)
                    nursery.start_soon(run, i, receive)
                    await trio.sleep(COUNT_AFTER_S)
                    tasks.append(len(nursery.child_tasks))
            closed_at = trio.current_time()
            feeder.cancel_scope.cancel()
    return Run([endings[i] for i in range(len(readers))], closed_at, tasks)


async def test_the_scope_is_cancelled_exactly_one_period_after_the_first_instant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    run = await run_readers(Reader())
    assert run.endings == [Ending(at=t0 + PERIOD_S, idle=True)]
    assert run.closed_at == t0 + PERIOD_S


async def test_each_message_moves_the_end_to_exactly_one_period_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Gaps just under the period, for three times the period: the reader lives on.
    t0 = trio.current_time()
    run = await run_readers(Reader(messages=(0.7, 3.6, 6.5, 9.4, 9.45)))
    assert run.endings == [Ending(at=t0 + 9.45 + PERIOD_S, idle=True)]
    assert run.closed_at == t0 + 9.45 + PERIOD_S


@pytest.mark.parametrize("how", ["stop", "leave"])
async def test_a_deadline_stopped_or_left_never_fires(
    autojump_clock: trio.testing.MockClock, how: str
) -> None:
    # Stopped (the goodbye has its own bound), or its block left, the deadline is gone:
    # the reader may wait in its scope far past the period.
    t0 = trio.current_time()
    run = await run_readers(Reader(messages=(1.0,), last=how, after_s=10 * PERIOD_S))
    assert run.endings == [Ending(at=t0 + 1.0 + 10 * PERIOD_S, idle=False)]


async def test_the_watcher_ends_as_its_last_reader_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The nursery closes with the reader's return, not at the deadline it no longer has.
    t0 = trio.current_time()
    run = await run_readers(Reader(messages=(1.0,), last="leave"))
    assert run.endings == [Ending(at=t0 + 1.0, idle=False)]
    assert run.closed_at == t0 + 1.0


async def test_one_watcher_task_keeps_two_deadlines_each_to_its_exact_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The second reader begins later with a shorter period: due before the first.
    t0 = trio.current_time()
    run = await run_readers(
        Reader(period_s=5.0, messages=(0.5, 2.0)),
        Reader(begins=1.0, period_s=1.0, messages=(1.5,)),
    )
    assert run.endings == [
        Ending(at=t0 + 2.0 + 5.0, idle=True),
        Ending(at=t0 + 1.5 + 1.0, idle=True),
    ]
    assert run.tasks == [2, 3]  # the readers, and one watcher for both
    assert run.closed_at == t0 + 7.0


async def test_a_watch_after_the_watcher_ended_is_kept_all_the_same(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    run = await run_readers(
        Reader(messages=(0.0,), last="leave"),
        Reader(begins=2.0),
    )
    assert run.endings == [Ending(at=t0, idle=False), Ending(at=t0 + 2.0 + PERIOD_S, idle=True)]
    assert run.tasks == [0, 2]  # the first reader and its watcher ended before the second
