"""What the gateway reads from Redis to admit a request -- the live workers (503) and a queue's
length (429) -- read once for all requests and kept a short while.

A burst of requests must not wait on these reads one by one: each request that waits is
suspended before its job is submitted, and the event loop serves everything else in between.
So a read is reused for its TTL, and one older than half of that is read again in the
background while requests go on with the value at hand: a steady flow of requests never waits.
Only a request that finds no value young enough (the first, or after a quiet spell longer than
the TTL) waits -- for the one read in flight, which every request in that moment shares.
And a value asked for in the last minute is read again every half TTL whether or not requests
come (`Admission.keep_fresh`): a burst after a quiet spell -- the common shape of a burst --
finds it young too, where it made every request of the burst wait for one read.

A queue's length as read goes stale as this gateway queues jobs: each job queued since the
read began is counted on top of it, so a burst from this gateway cannot overshoot the bound
however young the read. Jobs queued by others (other gateways, producers) and taken by workers
since the read show up at the next read, at most the TTL later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis

from producer.schemas import MAX_PRIORITY
from producer.settings import PRESENCE_KEY

T = TypeVar("T")

# What a request asked for within this many seconds is kept fresh without being asked.
KEPT_S = 60.0

# kombu's Redis transport keeps a queue's messages in one list per priority step (0 plain, n
# as "<queue>\x06\x16<n>"; producer/celery_app.py: a step per level of the contract).
_PRIORITY_SUFFIXES = ("", *(f"\x06\x16{step}" for step in range(1, MAX_PRIORITY + 1)))


class SharedRead(Generic[T]):
    """A value read by `read`, reused for `ttl_s` seconds and refreshed ahead of its expiry
    (see the module's docstring). A TTL of 0 reads for every request, sharing reads in
    flight."""

    def __init__(self, read: Callable[[], Awaitable[T]], ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read, self.ttl_s, self._clock = read, ttl_s, clock
        self._value: T | None = None
        self.read_at = float("-inf")
        self._reading: asyncio.Future[T] | None = None
        self.asked_at = float("-inf")

    @property
    def reading(self) -> asyncio.Future[T] | None:
        """The read in flight, if any."""
        return None if self._reading is None or self._reading.done() else self._reading

    def refresh(self) -> asyncio.Future[T]:
        """Read again now (or join the read in flight)."""
        return self._start()

    async def get(self) -> T:
        self.asked_at = now = self._clock()
        age = now - self.read_at
        if self._value is not None and age <= self.ttl_s:
            if age > self.ttl_s / 2:
                self._start()  # in the background: this request goes on with the value
            return self._value
        return await asyncio.shield(self._start())

    def _start(self) -> asyncio.Future[T]:
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read_now())
            # A background read that fails leaves the value to age; whoever waits sees why.
            self._reading.add_done_callback(_retrieve)
        return self._reading

    async def _read_now(self) -> T:
        read_at = self._clock()
        value = await self._read()
        if read_at >= self.read_at:
            self._value, self.read_at = value, read_at
        return value


def _retrieve(future: asyncio.Future[T]) -> None:
    if not future.cancelled():
        future.exception()


class Admission:
    """The live workers and the queues' lengths, as `SharedRead`s."""

    def __init__(self, client: aioredis.Redis, models_ttl_s: float,
                 queue_length_ttl_s: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.redis, self.queue_length_ttl_s, self._clock = client, queue_length_ttl_s, clock
        self.models = SharedRead(self._read_models, models_ttl_s, clock)
        self._lengths: dict[str, SharedRead[tuple[int, int]]] = {}
        # Jobs this gateway queued, per queue, ever: a read notes the count when it starts.
        self._queued: dict[str, int] = {}

    async def keep_fresh(self, kept_s: float = KEPT_S) -> None:
        """Forever: every half of the shortest TTL, read again what a request asked for in the
        last `kept_s` seconds (run as a task while the gateway serves)."""
        ttls = [ttl for ttl in (self.models.ttl_s, self.queue_length_ttl_s) if ttl > 0]
        if not ttls:
            return
        while True:
            await asyncio.sleep(min(ttls) / 2)
            now = self._clock()
            reads: list[SharedRead[Any]] = [self.models, *self._lengths.values()]
            for read in reads:
                if (read.ttl_s > 0 and now - read.asked_at <= kept_s
                        and now - read.read_at > read.ttl_s / 2):
                    read.refresh()

    async def live_models(self) -> dict[str, set[str]]:
        """Model id -> the queues its live workers consume (worker/presence.py)."""
        return await self.models.get()

    async def queue_length(self, queue: str) -> int:
        """The jobs waiting in `queue`, all priorities: as last read, plus the jobs this
        gateway queued since that read began."""
        length, queued_before = await self.length_read(queue).get()
        return length + self._queued.get(queue, 0) - queued_before

    def length_read(self, queue: str) -> SharedRead[tuple[int, int]]:
        """The read of `queue`'s length: (jobs waiting, jobs this gateway had queued when it
        began)."""
        read = self._lengths.get(queue)
        if read is None:
            read = self._lengths[queue] = SharedRead(
                lambda: self._read_length(queue), self.queue_length_ttl_s, self._clock)
        return read

    def queued(self, queue: str) -> None:
        """A job of this gateway's went into `queue`."""
        self._queued[queue] = self._queued.get(queue, 0) + 1

    async def _read_models(self) -> dict[str, set[str]]:
        members = await self.redis.zrangebyscore(PRESENCE_KEY, time.time(), "+inf")
        models: dict[str, set[str]] = {}
        for member in members:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(member)  # type: ignore[arg-type]  # members are bytes
                models.setdefault(str(entry["model"]), set()).add(str(entry["queue"]))
        return models

    async def _read_length(self, queue: str) -> tuple[int, int]:
        queued_before = self._queued.get(queue, 0)
        pipe = self.redis.pipeline(transaction=False)
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(queue + suffix)
        return sum(int(n) for n in await pipe.execute()), queued_before
