"""Batch progress for Prometheus, read from Redis at each scrape.

A collector, not counters: a batch's counts are kept exact in Redis by the workers (in the
transaction that stores each line's result), so a scrape reads them there and any process with
a registry -- the gateway, a sidecar -- can expose them; nothing has to see the lines end.

    from producer.batches.metrics import BatchCollector
    registry.register(BatchCollector(client._redis))   # a ChatQueueClient's redis

Needs prometheus_client (the gateway and worker extras), so `producer.batches` does not import
this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, get_args

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from producer.batches.ids import BATCHES_KEY, batch_key
from producer.batches.lifecycle import Status, batch_object

STATUSES: tuple[str, ...] = get_args(Status)
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")


def batch_families(records: Iterable[Mapping[str, str]], now: float) -> list[GaugeMetricFamily]:
    """chatqueue_batches{status}: how many of the batches read are in each status (every status
    at 0 from the first scrape); chatqueue_batch_requests{batch, state}: total, completed and
    failed lines of each batch still running (finished ones drop out, so the series stay few)."""
    batches = GaugeMetricFamily(
        "chatqueue_batches", "Batches (the most recent ones kept in Redis) by status.",
        labels=("status",))
    requests = GaugeMetricFamily(
        "chatqueue_batch_requests",
        "Lines of a running batch: total (as far as submitted), completed, failed.",
        labels=("batch", "state"))
    counts = dict.fromkeys(STATUSES, 0)
    for record in records:
        batch = batch_object(record, now)
        counts[batch["status"]] += 1
        if batch["status"] in RUNNING:
            for state, value in batch["request_counts"].items():
                requests.add_metric((batch["id"], state), value)
    for status, count in counts.items():
        batches.add_metric((status,), count)
    return [batches, requests]


class BatchCollector(Collector):
    """Reads the `limit` most recent batches' records in one round trip per scrape."""

    def __init__(self, redis: Any, limit: int = 100) -> None:
        self.redis, self.limit = redis, limit

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ids = self.redis.zrevrange(BATCHES_KEY, 0, self.limit - 1)
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(batch_key(_text(batch_id)))
            raw = pipe.execute() if ids else []
        records = [{_text(k): _text(v) for k, v in record.items()} for record in raw if record]
        yield from batch_families(records, time.time())

    def describe(self) -> list[GaugeMetricFamily]:
        return batch_families([], 0.0)  # no Redis read when the collector is registered


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
