"""One run per job id: the worker running a job holds its lease in Redis.

Celery delivers a job at least once: a job published twice, or handed out again by the
visibility timeout while its worker still runs it, reaches a second task slot. Before a slot
runs a job it takes the job's lease (`lease_key`: SET NX with a TTL, holding this run's token);
a keeper thread renews every lease this worker holds while its jobs run, and the lease is
released once the job's result is stored. A delivery that finds the lease held waits: it skips
the job once a final result appears, and runs it if the lease lapses without one (its holder
died). Stream writes are fenced by the lease too (`worker/control.py`), so a job's stream never
has two writers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from producer.settings import lease_key
from worker.errors import JobInterrupted

log = logging.getLogger(__name__)

# KEYS: lease; ARGV: token, ttl ms. 1: held (renewed, or taken back after it lapsed with nobody
# else taking it), 0: another run holds it.
RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease, job record; ARGV: token, record ttl s (0: leave the record).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
return 1
"""


@dataclass(eq=False)
class Lease:
    job_id: str
    token: str
    ttl_ms: int
    lost: threading.Event = field(default_factory=threading.Event)
    _on_lost: list[Callable[[], None]] = field(default_factory=list)

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` (e.g. cancel the engine job) if the lease is lost; at once if it is."""
        self._on_lost.append(callback)
        if self.lost.is_set():
            callback()

    def mark_lost(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        log.warning("job %s: its lease is held by another run now; this run stops and stores "
                    "nothing", self.job_id)
        for callback in self._on_lost:
            callback()


class LeaseKeeper:
    """Takes, renews and releases this worker's job leases."""

    def __init__(self, client: redis.Redis, *, ttl_s: float, renew_s: float,
                 owner: str | None = None) -> None:
        self.redis = client
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.renew_s = renew_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._held: dict[str, Lease] = {}  # by token
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._thread = threading.Thread(target=self._keep, name="chatqueue-leases", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def acquire(self, job_id: str) -> Lease | None:
        """The job's lease if nobody holds it, else None."""
        lease = Lease(job_id, f"{self.owner}:{uuid.uuid4().hex[:12]}", self.ttl_ms)
        if not self.redis.set(lease_key(job_id), lease.token, nx=True, px=self.ttl_ms):
            return None
        with self._lock:
            self._held[lease.token] = lease
        return lease

    def holder(self, job_id: str) -> str | None:
        value = self.redis.get(lease_key(job_id))
        return value.decode() if isinstance(value, bytes) else value

    def release(self, lease: Lease, *, record_key: str | None = None,
                record_ttl_s: int = 0) -> None:
        """Give the lease up (if still ours); with `record_key`, keep the job record for
        `record_ttl_s` more, as long as the result it describes."""
        with self._lock:
            self._held.pop(lease.token, None)
        self._release(keys=[lease_key(lease.job_id), record_key or lease_key(lease.job_id)],
                      args=[lease.token, record_ttl_s if record_key else 0])

    def claim(self, job_id: str, *, finished: Callable[[], bool],
              stopping: Callable[[], bool], poll_s: float = 0.5) -> Lease | None:
        """The job's lease, once nobody else runs it; None if the job has a final result
        (checked after the lease is taken, so a run that stored one and released is seen).

        While another live run holds it, wait: that run's result will do. If its holder dies,
        the lease lapses and this delivery runs the job. Raises JobInterrupted (back to the
        queue) when the worker stops while waiting; keeps trying while Redis is unreachable."""
        waiting_since: float | None = None
        while True:
            lease = None
            try:
                lease = self.acquire(job_id)
                if lease is not None:
                    if finished():
                        self.release(lease)
                        return None
                    if waiting_since is not None:
                        log.info("job %s: its lease is free after %.1f s and it has no result: "
                                 "this delivery runs it", job_id, time.monotonic() - waiting_since)
                    return lease
                if finished():
                    return None
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.info("job %s is running under lease %s: this delivery waits for it",
                             job_id, self.holder(job_id))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if lease is not None:  # taken, then Redis went away: let it lapse, try again
                    with self._lock:
                        self._held.pop(lease.token, None)
                log.warning("job %s: lease not taken, Redis unreachable (%s); retrying",
                            job_id, exc)
            if stopping():
                raise JobInterrupted("this worker is stopping")
            time.sleep(poll_s)

    def _keep(self) -> None:
        """Renew every held lease each renew_s; a lease someone else holds now is lost."""
        failing = False
        while not self._stop.wait(self.renew_s):
            with self._lock:
                held = list(self._held.values())
            if not held:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for lease in held:
                    self._renew(keys=[lease_key(lease.job_id)], args=[lease.token, self.ttl_ms],
                                client=pipe)
                kept = pipe.execute()
            except redis.RedisError as exc:
                if not failing:
                    log.warning("leases not renewed, Redis unreachable (%s); retrying", exc)
                failing = True
                continue
            failing = False
            for lease, ok in zip(held, kept, strict=True):
                if not ok:
                    with self._lock:
                        self._held.pop(lease.token, None)
                    lease.mark_lost()
