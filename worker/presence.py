"""A worker's presence: while it consumes its queue, it keeps itself in the sorted set
`chatqueue:workers` (member: node, model, queue; score: when the entry lapses). Readers -- the
gateway's GET /v1/models and its 503 -- take the members whose score is still ahead, so a
worker that dies drops out within PRESENCE_TTL_S without anyone cleaning up."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis

from producer.settings import PRESENCE_KEY, PRESENCE_TTL_S, presence_member

log = logging.getLogger(__name__)

# Renewed well inside the TTL, so one slow round trip does not make a live worker vanish.
_BEAT_S = PRESENCE_TTL_S / 3


def keep_present(client: redis.Redis, *, node: str, model_id: str, queue: str,
                 consuming: Callable[[], bool]) -> threading.Event:
    """Start the beat in a daemon thread; set the returned event to stop it (the entry is
    removed)."""
    member, stop = presence_member(node, model_id, queue), threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                if consuming():
                    client.zadd(PRESENCE_KEY, {member: time.time() + PRESENCE_TTL_S})
                else:
                    client.zrem(PRESENCE_KEY, member)
            except redis.RedisError as exc:  # Redis away: the entry lapses on its own
                log.warning("presence beat failed: %s", exc)
            stop.wait(_BEAT_S)
        with contextlib.suppress(redis.RedisError):
            client.zrem(PRESENCE_KEY, member)

    threading.Thread(target=beat, name="chatqueue-presence", daemon=True).start()
    return stop
