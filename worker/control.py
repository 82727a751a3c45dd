"""In-flight control through Redis: cancel requests in, token streams out.

Cancels arrive two ways, so none is missed: a key (`cancel_key`) that a job checks when it
starts, and a pub/sub message that reaches the jobs already running in this worker. A job
registers itself before it checks the key, so a cancel lands either in the key check or in
the registry.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery.utils.functional import maybe_list
from celery.worker.control import control_command, ok

from producer.batches import LINE_SEP, batch_cancel_key, batch_of_job, valid_batch_id
from producer.client import CANCEL_IF_KNOWN
from producer.connections import redis_client
from producer.schemas import JOB_ID_PATTERN, StreamEvent
from producer.settings import (
    CANCEL_CHANNEL,
    ConnectionSettings,
    accepted_key,
    cancel_key,
    lease_key,
    stream_key,
)
from worker.engine import EngineJob
from worker.lease import Lease

log = logging.getLogger(__name__)

_JOB_ID = re.compile(JOB_ID_PATTERN)


def valid_job_id(job_id: str) -> bool:
    """A job id the contract accepts: no control characters, so never a forged log line."""
    return bool(_JOB_ID.fullmatch(job_id))


# KEYS: stream, lease, progress (the job's result key); ARGV: lease token ('' for no fence),
# lease ms, restart (0/1), maxlen, stream ttl s, progress value ('' for none), progress ttl s,
# then per event its field count and fields. 0 (nothing written) when another run holds the
# lease. The progress (a PROGRESS state) never replaces a final one (SUCCESS/FAILURE/REVOKED).
FENCED_PUBLISH = """
if ARGV[1] ~= '' then
  local holder = redis.call('GET', KEYS[2])
  if holder ~= ARGV[1] then
    if holder then return 0 end
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  end
end
if ARGV[6] ~= '' then
  local current = redis.call('GET', KEYS[3])
  local final = false
  if current then
    local ok, meta = pcall(cjson.decode, current)
    if ok and type(meta) == 'table' and (meta.status == 'SUCCESS' or meta.status == 'FAILURE'
        or meta.status == 'REVOKED') then final = true end
  end
  if not final then redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[7]) end
end
if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) end
local i = 8
if i > #ARGV then return 1 end
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local entry = {KEYS[1], 'MAXLEN', '~', ARGV[4], '*'}
  for j = 1, 2 * n do entry[#entry + 1] = ARGV[i + j] end
  redis.call('XADD', unpack(entry))
  i = i + 1 + 2 * n
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


@dataclass(frozen=True)
class ProgressWrite:
    """A job's PROGRESS state as the result backend stores it."""

    key: str
    value: str | bytes
    ttl_s: int


class JobControl:
    def __init__(self, client: redis.Redis, *, ttl_s: int, stream_maxlen: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.stream_maxlen = stream_maxlen
        self._active: dict[str, EngineJob] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="chatqueue-cancel", daemon=True)
        self._fenced_publish = client.register_script(FENCED_PUBLISH)
        self._cancel_if_known = client.register_script(CANCEL_IF_KNOWN)

    @classmethod
    def connect(cls, settings: ConnectionSettings, *, ttl_s: int,
                stream_maxlen: int) -> JobControl:
        """On the current primary (following a Sentinel failover); leases use this client too."""
        client = redis_client(settings, health_check_interval=30, socket_keepalive=True)
        return cls(client, ttl_s=ttl_s, stream_maxlen=stream_maxlen).start()

    def start(self) -> JobControl:
        self._listener.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._listener.join(timeout=5)

    # --- cancellation
    def cancelled_before_start(self, job_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(job_id)))

    def track(self, job_id: str, job: EngineJob) -> None:
        with self._lock:
            self._active[job_id] = job
        keys = [cancel_key(job_id)]
        if (batch_id := batch_of_job(job_id)) is not None:
            keys.append(batch_cancel_key(batch_id))
        if self.redis.exists(*keys):
            job.cancel()

    def untrack(self, job_id: str) -> None:
        with self._lock:
            self._active.pop(job_id, None)

    def _listen(self) -> None:
        """Forward cancel messages to running jobs; reconnect after Redis goes away."""
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._on_cancel_message(message.get("data"))
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                self._stop.wait(1.0)
            finally:
                pubsub.close()

    def _on_cancel_message(self, data: Any) -> None:
        """One message on the cancel channel; whatever it holds, the listener goes on (a
        message that was not UTF-8 once ended it for good: later cancels were ignored)."""
        try:
            job_id = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        except UnicodeDecodeError:
            log.warning("cancel channel: ignored a message that is not UTF-8 (%r)", data[:80])
            return
        if not valid_job_id(job_id):
            log.warning("cancel channel: ignored an invalid job id %r", job_id[:140])
            return
        try:
            self._cancel(job_id)
        except Exception:
            log.exception("cancel of job %s failed", job_id)

    def revoke(self, job_id: str) -> bool:
        """Celery's revoke, as our cancel: the running job ends within a decode step, a queued
        one (here or on any worker, now or later) ends "cancelled" without running. False: no
        such job (never submitted, or expired); a job running here is cancelled all the same."""
        self._cancel(job_id)
        return bool(self._cancel_if_known(keys=[accepted_key(job_id), cancel_key(job_id)],
                                          args=[self.ttl_s, CANCEL_CHANNEL, job_id]))

    def _cancel(self, job_id: str) -> None:
        # A batch id cancels every line of the batch running here.
        prefix = f"{job_id}{LINE_SEP}" if valid_batch_id(job_id) else None
        with self._lock:
            jobs = [(active_id, job) for active_id, job in self._active.items()
                    if active_id == job_id or (prefix and active_id.startswith(prefix))]
        for active_id, job in jobs:
            log.info("job %s: cancel requested", active_id)
            job.cancel()

    # --- streaming
    def publish(self, job_id: str, events: list[StreamEvent], *, restart: bool = False,
                lease: Lease | None = None) -> bool:
        """Append events to the job's stream, bounded in length and expiring with its result.

        With the run's `lease`, the write is fenced: it happens only while this run holds the
        job's lease (taken back if it lapsed with nobody else taking it), so a job's stream
        never has two writers. False: another run holds it and nothing was written."""
        pipe = self.redis.pipeline(transaction=False)
        self.queue_publish(pipe, job_id, events, restart=restart, lease=lease)
        return bool(pipe.execute()[0])

    def queue_publish(self, pipe: Any, job_id: str, events: list[StreamEvent], *,
                      restart: bool = False, lease: Lease | None = None,
                      progress: ProgressWrite | None = None,
                      picked_at: float | None = None) -> None:
        """`publish` (and the job's progress) as one command in `pipe`, whose reply is 1, or 0
        when another run holds the lease. `picked_at`: when the oldest token of the events'
        text was picked (time.time()), written as the text events' `t` field for readers
        that measure how live a stream is (StreamEvent ignores it)."""
        args: list[Any] = ["" if lease is None else lease.token,
                           0 if lease is None else lease.ttl_ms, int(restart),
                           self.stream_maxlen, self.ttl_s,
                           "" if progress is None else progress.value,
                           0 if progress is None else progress.ttl_s]
        for event in events:
            dumped: dict[str, Any] = event.model_dump(mode="json", exclude_none=True)
            if picked_at is not None and event.text:
                dumped["t"] = f"{picked_at:.4f}"
            args.append(len(dumped))
            for name, value in dumped.items():
                args += [name, value]
        key = stream_key(job_id)
        self._fenced_publish(keys=[key, lease_key(job_id), key if progress is None
                                   else progress.key], args=args, client=pipe)


def wait_interval(started: float, *, first: float = 0.05, steady: float = 0.25) -> float:
    """Poll fast at first so a short job's stream and progress show up at once."""
    return first if time.monotonic() - started < 1.0 else steady


def install_revoke(control_for: Callable[[], JobControl | None]) -> None:
    """Make Celery's `revoke` control command -- `app.control.revoke(id)`,
    `revoke(id, terminate=True)`, `AsyncResult.revoke()`, Flower's buttons -- mean our cancel.

    Celery's own one stores REVOKED for a queued job (a TaskRevokedError where our cancel gives
    a "cancelled" result), and its terminate is not implemented by the threads pool: a running
    job ran on. Every worker receives the broadcast: each cancels the job if it runs it, and
    the cancel key ends it wherever it is queued.
    """

    @control_command(name="revoke", variadic="task_id", signature="[id1 [id2 [... [idN]]]]")
    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None,
               **_: Any) -> dict[str, Any]:
        """Cancel jobs by id: queued ones end cancelled, running ones within a decode step."""
        control = control_for()
        if control is None:
            return {"error": "this worker has no job control: it is not started"}
        given = [str(job_id) for job_id in maybe_list(task_id) or []]
        job_ids = sorted({job_id for job_id in given if valid_job_id(job_id)})
        if len(job_ids) < len(set(given)):
            log.warning("revoke: ignored %d invalid job id(s)", len(set(given)) - len(job_ids))
        known = [job_id for job_id in job_ids if control.revoke(job_id)]
        log.info("revoke%s of %s: cancelled as chatqueue jobs (%d known)",
                 " (terminate)" if terminate else "", ", ".join(job_ids), len(known))
        unknown = sorted(set(job_ids) - set(known))
        return ok(f"jobs {', '.join(known) or '-'} cancelled"
                  + (f"; no such job: {', '.join(unknown)}" if unknown else ""))
