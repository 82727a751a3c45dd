"""The Celery configuration both sides share: JSON only, results with a TTL, one queue per model."""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.settings import ConnectionSettings


def celery_config(settings: ConnectionSettings) -> dict[str, Any]:
    return {
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
        "enable_utc": True,
    }


def create_celery(settings: ConnectionSettings, name: str = "chatqueue") -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
