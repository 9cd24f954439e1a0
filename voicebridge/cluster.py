"""Several boxes as one service: what they share, in Redis, when ``[cluster]`` names one.

A box alone keeps everything it shares among its own processes in its directory
(``voicebridge.boxstate``); ``BoxOnly`` is that case here: no store, the box's limit alone.
Several boxes behind one balancer need three more things, which ``RedisStore`` keeps in
Redis (or Valkey), through ``coredis`` (built on anyio, so it runs under trio):

- **A cluster-wide admission limit with leases** (``cluster.max_calls``, normally the Vapi
  account's concurrency limit). Each reserved or streaming call holds a slot: a member of
  the sorted set ``<prefix>slots`` whose score is its lease's end (Redis's own clock, so
  the boxes' clocks never matter), and ``<prefix>owners`` says which process holds it.
  The voice webhook takes a slot (``acquire``, one Lua script: expired slots go, then
  the count is compared with the limit, so the limit holds exactly however many boxes
  ask at once). Each process renews the leases of the calls it holds every third of
  ``cluster.lease_s`` and gives back the others as soon as its calls change
  (``run``): a box that dies stops renewing, and its slots are free within the lease.
- **The outcomes that ``<Connect action>``s read**: each finished call's record, under
  ``<prefix>outcome:<CallSid>`` for ``OUTCOME_RETENTION_S``, so that an action reaching
  another box is answered right; that box waits for a call still winding down.
- **Single-use stream tokens across boxes**: by construction rather than by a lookup. A
  box with its own ``server.box_url`` signs its tokens with a key derived from the shared
  secret and that URL (``box_token_secret``): every other box refuses them (``bad-signature``),
  whether or not the store answers, and the box's directory keeps them single-use there.

When the store fails (down, slow, unreachable), calls already up never notice: leases are
renewed again when it is back (re-adding the calls it lost), records are published as
calls end. Admission waits at most ``cluster.store_deadline_ms`` and then decides as
``cluster.on_store_failure`` says: the box's own limit (``box-limit``), or the overflow
message (``refuse``). After a failure, admission does not ask the store again for
``RETRY_AFTER_S`` (the lease task probes it meanwhile). One warning is logged per outage,
and one line when it is back; each failure is counted
(``voicebridge_cluster_store_failures_total``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import math
import os
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import trio

from voicebridge.boxstate import OUTCOME_RETENTION_S, decode_record, encode_record
from voicebridge.bridge.outcome import CallRecord
from voicebridge.observability.logs import log_event

if TYPE_CHECKING:
    import coredis

    from voicebridge.bridge.registry import CallRegistry
    from voicebridge.config import ClusterConfig

log = logging.getLogger(__name__)

#: After a failure, admission decides without the store for this long (the lease task
#: keeps probing it), so that an outage costs each webhook nothing, not the deadline.
RETRY_AFTER_S = 1.0
#: A ``<Connect action>`` waiting for another box's call waits in steps this long.
WAIT_STEP_S = 1.0
#: Records waiting to be published; past this (a store down during a burst) the oldest
#: calls' records stay on their box only.
PUBLISH_BACKLOG = 1000

# Frees the expired slots, then takes one for ARGV[1] unless the limit is reached.
# 1: taken, 2: held already (a repeat of the webhook), 0: the service is full.
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], sid)
  redis.call('HDEL', KEYS[2], sid)
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 2 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""
# Renews the leases of ARGV[4 .. 3+ARGV[3]] (this process's calls), and gives back those
# after them that this process still owns (another may have taken a call over since).
_SYNC = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local renewed = tonumber(ARGV[3])
for i = 4, 3 + renewed do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[1])
end
for i = 4 + renewed, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
return redis.call('ZCARD', KEYS[1])
"""
# Publishes a record as a one-element list (BLMOVE onto itself waits for it).
_PUBLISH = """
redis.call('DEL', KEYS[1])
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# A call's record, and whether the call still holds a slot somewhere (still going).
_LOOKUP = """
local record = redis.call('LINDEX', KEYS[1], 0)
local held = redis.call('ZSCORE', KEYS[2], ARGV[1]) and 1 or 0
return {record or false, held}
"""


class Acquired(enum.Enum):
    """What the store said to a new call's request for a slot."""

    #: A slot was taken for it.
    TAKEN = "taken"
    #: It held one already (the webhook repeated).
    HELD = "held"
    #: The service is at ``cluster.max_calls``.
    FULL = "full"
    #: The store did not answer in time (or failed): decide without it.
    UNAVAILABLE = "unavailable"


class ClusterObserver(Protocol):
    def cluster_store_failed(self, operation: str) -> None: ...


class ClusterStore(Protocol):
    """What a box shares with the other boxes of its service."""

    #: New calls are refused while the store does not answer (``on_store_failure``).
    refuse_without_store: bool

    async def acquire(self, call_sid: str) -> Acquired:
        """A slot for the new call ``call_sid`` (the voice webhook, before admitting it).
        Returns within the store's deadline; cancelling it takes no slot or frees it
        at the next sync."""
        ...

    def published(self, record: CallRecord) -> None:
        """``record``'s call ended here: make its record readable by every box."""
        ...

    async def load_record(self, call_sid: str, wait_s: float) -> CallRecord | None:
        """The record another box published for ``call_sid``; waits up to ``wait_s``
        while that call still holds a slot (it is winding down). None if none."""
        ...

    async def run(
        self,
        registry: CallRegistry,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the leases of ``registry``'s calls and publish records, until cancelled."""
        ...


class BoxOnly:
    """No store: the box decides alone, its processes sharing ``server.shared_dir``."""

    refuse_without_store = False

    async def acquire(self, call_sid: str) -> Acquired:
        return Acquired.TAKEN

    def published(self, record: CallRecord) -> None:
        """Nothing to do: the registry wrote it to the box's directory."""

    async def load_record(self, call_sid: str, wait_s: float) -> CallRecord | None:
        return None

    async def run(
        self,
        registry: CallRegistry,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()


def box_token_secret(secret: bytes, box_url: str) -> bytes:
    """The stream token key of the box at ``box_url``: tokens it issues verify on no other
    box. Empty ``secret`` stays empty (no previous secret)."""
    if not secret:
        return secret
    label = b"voicebridge stream tokens of " + box_url.encode()
    return hmac.new(secret, label, hashlib.sha256).digest()


class RedisStore:
    """``ClusterStore`` in Redis at ``config.redis_url`` (see the module docstring).

    ``owner`` names this process in ``<prefix>owners`` (unique per process: a new one
    each start, so that a restarted process never gives back its predecessor's slots).
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        owner: str = "",
        observer: ClusterObserver | None = None,
        client_factory: Callable[[], coredis.Redis[bytes]] | None = None,
    ) -> None:
        self._config = config
        self.refuse_without_store = config.on_store_failure == "refuse"
        self._owner = owner or f"{os.uname().nodename}/{os.getpid()}/{secrets.token_hex(4)}"
        self._observer = observer
        self._client_factory = client_factory or self._new_client
        self._prefix = config.key_prefix
        self._slots = self._prefix + "slots"
        self._owners = self._prefix + "owners"
        self._deadline_s = config.store_deadline_ms / 1000
        self._client: coredis.Redis[bytes] | None = None
        self._scripts: dict[str, Any] = {}
        # The CallSids this process took or renewed slots for (what ``run`` gives back
        # once the registry no longer holds them).
        self._held: set[str] = set()
        # Invariant: while trio.current_time() < _down_until, admission skips the store.
        self._down_until = -math.inf
        # Invariant: True from a logged failure to the next success (one warning an outage).
        self._failing = False
        self._wake = trio.Event()
        self._records_in, self._records_out = trio.open_memory_channel[CallRecord](
            PUBLISH_BACKLOG
        )

    def _new_client(self) -> coredis.Redis[bytes]:
        import coredis  # only a box with a store needs the library
        from coredis.retry import NoRetryPolicy

        return coredis.Redis.from_url(
            self._config.redis_url,
            retry_policy=NoRetryPolicy(),
            connect_timeout=self._deadline_s,
            stream_timeout=max(self._deadline_s, WAIT_STEP_S) + 1.0,
        )

    # -- the voice webhook and the <Connect action> ------------------------------------

    async def acquire(self, call_sid: str) -> Acquired:
        if trio.current_time() < self._down_until:
            return Acquired.UNAVAILABLE
        result = await self._attempt(
            "acquire",
            partial(
                self._call,
                "acquire",
                keys=[self._slots, self._owners],
                args=[call_sid, self._owner, self._config.max_calls, self._lease_ms()],
            ),
        )
        if result is None:
            return Acquired.UNAVAILABLE
        if result == 0:
            return Acquired.FULL
        self._held.add(call_sid)
        self._wake.set()  # give it back at once if the registry does not keep it
        return Acquired.TAKEN if result == 1 else Acquired.HELD

    def published(self, record: CallRecord) -> None:
        if not record.call_sid:
            return
        try:
            self._records_in.send_nowait(record)
        except trio.WouldBlock:
            self._failed("publish", f"{PUBLISH_BACKLOG} records waiting")

    async def load_record(self, call_sid: str, wait_s: float) -> CallRecord | None:
        key = self._prefix + "outcome:" + call_sid
        found = await self._attempt(
            "lookup",
            partial(self._call, "lookup", keys=[key, self._slots], args=[call_sid]),
        )
        if found is None:
            return None
        body, held = found
        if not body and held and wait_s > 0:
            client = self._client
            assert client is not None
            from coredis import PureToken

            # BLMOVE onto itself: wakes when the record is published, leaves it there.
            # In steps shorter than the client's read timeout, so that waiting for a
            # call still winding down is never taken for a store that does not answer.
            end = trio.current_time() + wait_s
            with trio.move_on_after(wait_s + self._deadline_s):
                while not body and (left_s := end - trio.current_time()) > 0.01:
                    try:
                        body = await client.blmove(
                            key, key, PureToken.RIGHT, PureToken.RIGHT,
                            timeout=round(min(left_s, WAIT_STEP_S), 2),
                        )  # fmt: skip
                    except (OSError, _redis_errors()) as exc:
                        self._failed("lookup", str(exc))
                        return None
        return decode_record(body, f"Redis key {key}") if body else None

    # -- the process's task ------------------------------------------------------------

    async def run(
        self,
        registry: CallRegistry,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        client = self._client_factory()
        async with client:
            self._client = client
            self._scripts = {
                name: client.register_script(text)
                for name, text in (
                    ("acquire", _ACQUIRE),
                    ("sync", _SYNC),
                    ("publish", _PUBLISH),
                    ("lookup", _LOOKUP),
                )
            }
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_leases, registry)
                    nursery.start_soon(self._publish_records)
                    task_status.started()
            finally:
                self._client = None

    async def _keep_leases(self, registry: CallRegistry) -> None:
        """Renew the leases of the calls ``registry`` holds; give back the others, as soon
        as its calls change (or a slot was taken) and at least every third of the lease."""
        interval_s = self._config.lease_s / 3
        while True:
            seen = registry.changes
            self._wake = trio.Event()
            holding = registry.holding()
            released = self._held - holding
            renewed = sorted(holding)
            synced = await self._attempt(
                "renew",
                partial(
                    self._call,
                    "sync",
                    keys=[self._slots, self._owners],
                    args=[self._owner, self._lease_ms(), len(renewed), *renewed, *released],
                ),
            )
            if synced is not None:
                self._held -= released
                self._held |= holding
            with trio.move_on_after(interval_s):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_first, nursery, self._wake.wait)
                    nursery.start_soon(
                        _first, nursery, partial(registry.wait_changed_since, seen)
                    )

    async def _publish_records(self) -> None:
        retention_ms = int(OUTCOME_RETENTION_S * 1000)
        async for record in self._records_out:
            key = self._prefix + "outcome:" + record.call_sid
            body = encode_record(record)
            await self._attempt(
                "publish",
                partial(self._call, "publish", keys=[key], args=[body, retention_ms]),
            )

    # -- failures ----------------------------------------------------------------------

    def _call(self, script: str, *, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        return self._scripts[script](keys=keys, args=args)  # type: ignore[no-any-return]

    def _lease_ms(self) -> int:
        return int(self._config.lease_s * 1000)

    async def _attempt(self, operation: str, request: Callable[[], Awaitable[Any]]) -> Any:
        """``await request()`` within the store's deadline; None when it failed (logged
        once per outage, counted each time)."""
        if self._client is None:
            self._failed(operation, "not connected")
            return None
        with trio.move_on_after(self._deadline_s):
            try:
                result = await request()
            except (OSError, _redis_errors()) as exc:
                self._failed(operation, str(exc) or type(exc).__name__)
                return None
            self._succeeded()
            return result
        self._failed(operation, f"no answer within {self._deadline_s * 1000:g} ms")
        return None

    def _failed(self, operation: str, why: str) -> None:
        self._down_until = trio.current_time() + RETRY_AFTER_S
        if self._observer is not None:
            self._observer.cluster_store_failed(operation)
        if self._failing:
            return
        self._failing = True
        log_event(
            log,
            logging.WARNING,
            "cluster-store-failed",
            f"cluster store: {operation} failed ({why}); admitting "
            + (
                "up to this box's own limit"
                if self._config.on_store_failure == "box-limit"
                else "no new calls"
            )
            + " until it answers again",
            operation=operation,
        )

    def _succeeded(self) -> None:
        self._down_until = -math.inf
        if self._failing:
            self._failing = False
            log_event(
                log,
                logging.INFO,
                "cluster-store-recovered",
                "cluster store answers again; the cluster limit applies",
            )


async def _first(nursery: trio.Nursery, wait: Callable[[], Awaitable[object]]) -> None:
    """``await wait()``, then stop the nursery's other waits."""
    await wait()
    nursery.cancel_scope.cancel()


def _redis_errors() -> type[Exception]:
    from coredis.exceptions import RedisError

    return RedisError


def cluster_store(
    config: ClusterConfig, *, observer: ClusterObserver | None = None
) -> ClusterStore:
    """The store ``[cluster]`` configures: Redis, or the box alone."""
    return RedisStore(config, observer=observer) if config.enabled else BoxOnly()
