"""The Celery configuration both sides share: JSON only, results with a TTL, one queue per model."""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.schemas import DEFAULT_PRIORITY
from producer.settings import ConnectionSettings

# kombu's Redis transport keeps one list per priority step and pops them in order, 0 first (on
# Redis 0 is the highest priority, the reverse of RabbitMQ); step 0 is the queue's own name.
# Its default steps, named so both sides agree: Flower's queue lengths and every tool that reads
# the queue's own list see interactive jobs where they always were.
PRIORITY_STEPS = [0, 3, 6, 9]


def broker_priority(priority: int) -> int:
    """The Redis list a job of the contract's priority (higher first) waits in: interactive jobs
    (DEFAULT_PRIORITY) and above in the first, popped before any other; 3-4, 1-2 and 0 in the
    next three. Within a list jobs are taken in order; the engine then admits the exact
    priority first."""
    if priority >= DEFAULT_PRIORITY:
        return 0
    if priority >= 3:
        return 3
    return 6 if priority >= 1 else 9


def celery_config(settings: ConnectionSettings) -> dict[str, Any]:
    config = _celery_config(settings)
    if settings.uses_sentinel:
        # sentinel:// URLs: kombu and Celery ask the sentinels for the primary of master_name.
        # redis-py turns a ReadOnlyError from a demoted primary into a ConnectionError on
        # Sentinel-managed connections; naming it here too makes the result backend retry it
        # whatever path raised it.
        config.setdefault("broker_transport_options", {}).update(
            settings.sentinel_transport_options())
        config["result_backend_transport_options"].update(
            settings.sentinel_transport_options(),
            additional_connection_errors=["redis.exceptions.ReadOnlyError"])
    return config


def _celery_config(settings: ConnectionSettings) -> dict[str, Any]:
    tls: dict[str, Any] = {}
    # rediss://: the same TLS options on every side (settings.tls_options). Without them kombu
    # fell back to no certificate check, and Celery's result backend refused the URL.
    broker_tls = settings.tls_options(settings.broker_url)
    if broker_tls is not None:
        tls["broker_use_ssl"] = broker_tls
    # With Sentinel, results go to the primary the sentinels name, over TLS when the broker URL
    # says rediss:// (without this the result backend spoke plain text to a TLS primary).
    backend_tls = settings.tls_options(settings.broker_url if settings.uses_sentinel
                                       else settings.result_backend or settings.broker_url)
    if backend_tls is not None:
        tls["redis_backend_use_ssl"] = backend_tls
    return tls | {
        "broker_url": settings.broker_connection_url(),
        "result_backend": settings.backend_connection_url(),
        # Pickle on the wire is remote code execution: accept JSON and nothing else.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_ttl_s,
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        # Ride out a Redis restart rather than fail. Storing a result and reconnecting the
        # result subscription retry for about a minute (Celery's default: 20 s), reading one
        # with backoff for as long; publishing a job retries for about 15 s (default: under
        # 1 s), so a submit() that returns has its job in Redis and one that cannot raises.
        "result_backend_transport_options": {
            "retry_policy": {
                "max_retries": 60, "interval_start": 0, "interval_step": 1, "interval_max": 1,
            },
        },
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        "result_backend_base_sleep_between_retries_ms": 250,
        "result_backend_max_sleep_between_retries_ms": 4000,
        "task_publish_retry_policy": {
            "max_retries": 10, "interval_start": 0, "interval_step": 0.5, "interval_max": 2,
        },
        "enable_utc": True,
        "broker_transport_options": {"priority_steps": list(PRIORITY_STEPS)},
    }


def create_celery(settings: ConnectionSettings, name: str = "chatqueue",
                  cls: type[Celery] = Celery) -> Celery:
    app = cls(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
