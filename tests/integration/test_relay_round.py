"""The worker's relay against a real Redis: a round is written so that a reader of many
streams hears it once."""

from __future__ import annotations

import os
import threading
from typing import Any

import redis as redis_py

from chatqueue_dev.servers import RedisServer, wait_until
from producer.settings import stream_key
from worker.control import JobControl
from worker.engine import EngineJob, EngineRequest
from worker.pipeline.reasoning import ThinkTokens
from worker.pipeline.sampling import SamplingParams
from worker.relay import Relay


def test_a_round_is_one_transaction_that_a_blocked_reader_hears_whole(
        redis: RedisServer) -> None:
    """The relay writes a round -- every job's news of an engine step -- as one MULTI/EXEC, so
    a reader blocked on all the round's streams (the gateway's one XREAD) is served once the
    whole round is written. Redis 7.2 and later re-run an unblocked XREAD over all its keys:
    one reply with every stream (compose's Redis). Redis 7.0 (CI's) answers with the stream
    that woke it alone, and the reader's next read, at once, has all the others -- also when
    the round is too large for one read of Redis's input (a plain pipeline then ran in parts,
    and a reader could catch it between them)."""
    client = redis_py.Redis.from_url(redis.url)
    relay = Relay(JobControl(client, ttl_s=60, stream_maxlen=100), tokenizer=None,
                  think=ThinkTokens(open_id=1, close_id=2))
    jobs = [f"round-{os.getpid()}-{n}" for n in range(8)]
    for job_id in jobs:
        relay.follow(job_id, EngineJob(request=EngineRequest(
            prompt_ids=[5], max_new_tokens=4, sampling=SamplingParams(do_sample=False),
            stop_ids=frozenset())), prompt_opened_thinking=False)
    reader = redis_py.Redis.from_url(redis.url, client_name="round-reader")
    replies: list[Any] = []
    read = threading.Thread(target=lambda: replies.append(
        reader.xread({stream_key(job_id): "0-0" for job_id in jobs}, block=30_000)))
    read.start()
    wait_until(lambda: any(c.get("name") == "round-reader" and c.get("cmd") == "xread"
                           and "b" in c.get("flags", "") for c in client.client_list()),
               timeout=10, what="the reader to block in its XREAD")
    transactions = exec_calls(client)
    relay.relay_once(now=0.0)  # the jobs' start events: one round
    read.join(timeout=30)
    assert relay.writes == 1
    assert exec_calls(client) == transactions + 1
    (reply,) = replies
    heard = {key.decode(): entries for key, entries in reply}
    version = tuple(int(part) for part in client.info("server")["redis_version"].split(".")[:2])
    if version < (7, 2):
        assert len(heard) == 1
        rest = reader.xread({key: "0-0" for key in map(stream_key, jobs) if key not in heard})
        heard |= {key.decode(): entries for key, entries in rest}
    assert sorted(heard) == sorted(stream_key(job_id) for job_id in jobs)
    assert all(len(entries) == 1 for entries in heard.values())  # each job's start event


def exec_calls(client: redis_py.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))
