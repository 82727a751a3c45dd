"""In-flight control through Redis: cancel requests in, token streams out.

Cancels arrive two ways, so none is missed: a key (`cancel_key`) that a job checks when it
starts, and a pub/sub message that reaches the jobs already running in this worker. A job
registers itself before it checks the key, so a cancel lands either in the key check or in
the registry.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from producer.schemas import StreamEvent
from producer.settings import CANCEL_CHANNEL, cancel_key, stream_key
from worker.engine import EngineJob

log = logging.getLogger(__name__)


class JobControl:
    def __init__(self, client: redis.Redis, *, ttl_s: int, stream_maxlen: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.stream_maxlen = stream_maxlen
        self._active: dict[str, EngineJob] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="chatqueue-cancel", daemon=True)

    @classmethod
    def connect(cls, url: str, *, ttl_s: int, stream_maxlen: int) -> JobControl:
        client = redis.Redis.from_url(url, health_check_interval=30, socket_keepalive=True)
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
        if self.redis.exists(cancel_key(job_id)):
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
                        self._cancel(message["data"].decode())
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                self._stop.wait(1.0)
            finally:
                pubsub.close()

    def _cancel(self, job_id: str) -> None:
        with self._lock:
            job = self._active.get(job_id)
        if job is not None:
            log.info("job %s: cancel requested", job_id)
            job.cancel()

    # --- streaming
    def publish(self, job_id: str, events: list[StreamEvent], *, restart: bool = False) -> None:
        """Append events to the job's stream, bounded in length and expiring with its result."""
        key = stream_key(job_id)
        pipe = self.redis.pipeline(transaction=False)
        if restart:
            pipe.delete(key)  # a redelivered job streams again from its start
        for event in events:
            fields: dict[Any, Any] = event.model_dump(mode="json", exclude_none=True)
            pipe.xadd(key, fields, maxlen=self.stream_maxlen, approximate=True)
        pipe.expire(key, self.ttl_s)
        pipe.execute()


def wait_interval(started: float, *, first: float = 0.05, steady: float = 0.25) -> float:
    """Poll fast at first so a short job's stream and progress show up at once."""
    return first if time.monotonic() - started < 1.0 else steady
