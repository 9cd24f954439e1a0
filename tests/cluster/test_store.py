"""The cluster store against a real ``redis-server``: two stores stand for two boxes, each
with its own real ``CallRegistry``. The limit under concurrent requests, leases renewed by
a live box and lapsing for a dead one, slots given back as calls end, outcomes read by the
other box, and the store going away and coming back.

Real time (Redis's clock decides leases), short leases, a ``fail_after`` on every test.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.cluster.redis_fixture import RedisServer, needs_redis, running_redis
from tests.test_boxstate import a_record
from voicebridge.bridge.registry import CallRegistry
from voicebridge.cluster import RETRY_AFTER_S, WAIT_STEP_S, Acquired, RedisStore
from voicebridge.config import ClusterConfig
from voicebridge.observability.logs import record_fields

pytestmark = needs_redis

LEASE_S = 0.9


async def eventually(ask: Callable[[], Awaitable[bool]], *, within_s: float) -> float:
    """Seconds until ``ask()`` is true, asking every 20 ms: the store is another process,
    which tells nobody when a lease lapses."""
    started = trio.current_time()
    with trio.fail_after(within_s):
        while True:
            if await ask():
                return trio.current_time() - started
            await trio.sleep(0.02)


def sid(n: int) -> str:
    return f"CA{n:032x}"


class Failures:
    def __init__(self) -> None:
        self.operations: list[str] = []

    def cluster_store_failed(self, operation: str) -> None:
        self.operations.append(operation)


class BoxUnderTest:
    def __init__(self, store: RedisStore, registry: CallRegistry, scope: trio.CancelScope):
        self.store = store
        self.registry = registry
        self.scope = scope

    async def admit(self, call_sid: str) -> Acquired:
        """What the voice webhook does: a slot in the cluster, then the box's admission."""
        acquired = await self.store.acquire(call_sid)
        if acquired in (Acquired.TAKEN, Acquired.HELD, Acquired.UNAVAILABLE):
            self.registry.admit(call_sid, lambda: "<Response/>")
        return acquired


@asynccontextmanager
async def a_box(
    redis: RedisServer, failures: Failures | None = None, **cluster: object
) -> AsyncIterator[BoxUnderTest]:
    config = ClusterConfig(
        redis_url=redis.url, key_prefix="test:", lease_s=LEASE_S, **cluster  # type: ignore[arg-type]
    )
    store = RedisStore(config, observer=failures)
    registry = CallRegistry(max_calls=50, reservation_ttl_s=60, publish=store.published)
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            await nursery.start(store.run, registry)
            yield BoxUnderTest(store, registry, scope)
        nursery.cancel_scope.cancel()


async def test_the_cluster_limit_holds_exactly_when_boxes_ask_at_once(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            running_redis(tmp_path) as redis,
            a_box(redis, max_calls=3) as a,
            a_box(redis, max_calls=3) as b,
        ):
            answers: dict[str, Acquired] = {}

            async def ask(box: BoxUnderTest, call_sid: str) -> None:
                answers[call_sid] = await box.admit(call_sid)

            async with trio.open_nursery() as nursery:
                for n in range(10):
                    nursery.start_soon(ask, (a, b)[n % 2], sid(n))
            taken = sorted(s for s, answer in answers.items() if answer is Acquired.TAKEN)
            assert len(taken) == 3
            assert sum(answer is Acquired.FULL for answer in answers.values()) == 7
            # The webhook repeated (at either box) finds its slot: no second one.
            assert await a.store.acquire(taken[0]) is Acquired.HELD
            assert await b.store.acquire(sid(99)) is Acquired.FULL


async def test_a_live_box_keeps_its_slots_and_a_dead_one_loses_them_within_the_lease(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with running_redis(tmp_path) as redis, a_box(redis, max_calls=1) as b:
            async with a_box(redis, max_calls=1) as a:
                assert await a.admit(sid(1)) is Acquired.TAKEN
                a.registry.begin(sid(1), lambda outcome, detail: 0.0)
                await trio.sleep(LEASE_S * 3)  # three leases: renewed all along
                assert await b.admit(sid(2)) is Acquired.FULL
                # Box A dies: its task stops renewing, and gives nothing back.
                a.scope.cancel()

            async def b_admits() -> bool:
                return await b.admit(sid(2)) is Acquired.TAKEN

            await eventually(b_admits, within_s=LEASE_S + 0.3)


async def test_a_slot_is_given_back_when_its_call_ends_and_its_outcome_reaches_any_box(
    tmp_path: Path,
) -> None:
    failures = Failures()
    with trio.fail_after(20):
        async with (
            running_redis(tmp_path) as redis,
            a_box(redis, max_calls=1) as a,
            a_box(redis, failures, max_calls=1) as b,
        ):
            assert await a.admit(sid(1)) is Acquired.TAKEN
            a.registry.begin(sid(1), lambda outcome, detail: 0.0)
            record = a_record(sid(1))

            async def finish_later() -> None:
                await trio.sleep(WAIT_STEP_S * 1.6)  # longer than one step of the wait
                a.registry.finish(record)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish_later)
                # Box B, asked for the <Connect action> of a call still going on A, waits.
                started = trio.current_time()
                assert await b.store.load_record(sid(1), wait_s=3.0) == record
                assert WAIT_STEP_S * 1.5 <= trio.current_time() - started < WAIT_STEP_S * 2.5
            # The slot came back at once (well within a lease).
            async def b_admits() -> bool:
                return await b.admit(sid(2)) is Acquired.TAKEN

            await eventually(b_admits, within_s=LEASE_S / 2)
            # A call no box holds is answered at once: nothing to wait for.
            with trio.fail_after(0.5):
                assert await b.store.load_record(sid(7), wait_s=3.0) is None
    assert failures.operations == []  # waiting is not failing


async def test_a_call_refused_by_its_box_gives_its_slot_back(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            running_redis(tmp_path) as redis,
            a_box(redis, max_calls=1) as a,
            a_box(redis, max_calls=1) as b,
        ):
            a.registry.start_draining()  # the box refuses whatever the store says
            assert await a.store.acquire(sid(1)) is Acquired.TAKEN

            async def b_admits() -> bool:
                return await b.admit(sid(2)) is Acquired.TAKEN

            await eventually(b_admits, within_s=LEASE_S / 2)


async def test_the_store_going_away_and_coming_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge.cluster")
    failures = Failures()
    with trio.fail_after(30):
        async with (
            running_redis(tmp_path) as redis,
            a_box(redis, failures, max_calls=2, store_deadline_ms=200) as a,
        ):
            assert await a.admit(sid(1)) is Acquired.TAKEN
            a.registry.begin(sid(1), lambda outcome, detail: 0.0)
            await redis.stop()
            started = trio.current_time()
            assert await a.admit(sid(2)) is Acquired.UNAVAILABLE
            assert trio.current_time() - started < 0.5  # the deadline, not a hang
            # Within the retry pause, the store is not even asked.
            started = trio.current_time()
            for n in range(3, 8):
                assert await a.admit(sid(n)) is Acquired.UNAVAILABLE
            assert trio.current_time() - started < 0.05
            await trio.sleep(LEASE_S)  # the lease task fails to renew meanwhile
            await redis.start()  # empty: every slot was lost with it

            async def answers() -> bool:
                return await a.store.acquire(sid(20)) is not Acquired.UNAVAILABLE

            async def full() -> bool:
                return await a.store.acquire(sid(21)) is Acquired.FULL

            await eventually(answers, within_s=RETRY_AFTER_S + LEASE_S)
            # Back: the calls that went on (and were admitted meanwhile) hold slots again,
            # so the limit counts them.
            await eventually(full, within_s=LEASE_S)
    warnings = [
        record_fields(r) for r in caplog.records if r.name == "voicebridge.cluster"
    ]
    events = [fields.get("EVENT") for fields in warnings]
    assert events.count("cluster-store-failed") == 1
    assert events.count("cluster-store-recovered") == 1
    # Whichever asked first failed (a webhook, or the lease task's probe); the lease task
    # kept failing all through the outage.
    assert failures.operations.count("renew") >= 2
    assert set(failures.operations) <= {"acquire", "renew"}
