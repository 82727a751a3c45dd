"""`chatqueue-worker` that SIGKILLs itself the moment the broker hands it a job.

    CHATQUEUE_TEST_KILL_ON_DELIVERY=<queue> \
        python -m tests.support.killed_on_delivery_worker run ...

The real worker, except that when a message from <queue> reaches the transport's delivery --
the broker's reply read and parsed, before Celery has seen the message -- the process kills
itself with SIGKILL: the crash of a worker right after it took a job off the queue, which
nothing in the process can clean up after. With CHATQUEUE_TEST_KILL_HOLDING_RESTORE_LOCK=1 it
first takes kombu's restore lock (the one a worker holds while it puts dead workers' jobs back
in the queue) as kombu would, with this worker's settings: it dies holding it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import redis
from kombu.transport.virtual import base

from worker.cli import main

QUEUE = os.environ["CHATQUEUE_TEST_KILL_ON_DELIVERY"]
HOLD_RESTORE_LOCK = os.environ.get("CHATQUEUE_TEST_KILL_HOLDING_RESTORE_LOCK") == "1"
_deliver = base.Transport._deliver


def _deliver_or_die(self: Any, message: Any, queue: str) -> Any:
    if queue == QUEUE:
        if HOLD_RESTORE_LOCK:
            channel = self.channels[0]
            client = redis.Redis.from_url(os.environ["CHATQUEUE_BROKER_URL"])
            lock = client.lock(channel.unacked_mutex_key, timeout=channel.unacked_mutex_expire)
            assert lock.acquire(blocking=False)
        os.kill(os.getpid(), signal.SIGKILL)
    return _deliver(self, message, queue)


base.Transport._deliver = _deliver_or_die  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main())
