"""The one way chatqueue's own Redis clients are made (job records, streams, cancels, leases).

Plain Redis: a client from the broker URL. Redis Sentinel (`redis_sentinels` set): a client of
the primary the sentinels name (`Sentinel.master_for`). Each new connection asks them again,
and a primary turned replica (a ReadOnlyError) drops the connection, so these clients follow a
failover as Celery's broker and result backend do.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from producer.settings import ConnectionSettings


def redis_client(settings: ConnectionSettings, **kwargs: Any) -> redis.Redis:
    """A client of the current Redis primary; `kwargs` go to redis.Redis (retry, timeouts)."""
    kwargs = {**_tls_kwargs(settings), **kwargs}
    if not settings.uses_sentinel:
        return redis.Redis.from_url(settings.broker_connection_url(), **kwargs)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses(), sentinel_kwargs=_sentinel_kwargs(settings))
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, **_master_kwargs(settings), **kwargs)
    return client


def async_redis_client(settings: ConnectionSettings, **kwargs: Any) -> aioredis.Redis:
    """As redis_client, for asyncio."""
    kwargs = {**_tls_kwargs(settings), **kwargs}
    if not settings.uses_sentinel:
        return aioredis.Redis.from_url(settings.broker_connection_url(), **kwargs)
    sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses(), sentinel_kwargs=_sentinel_kwargs(settings))
    client: aioredis.Redis = sentinel.master_for(settings.redis_sentinel_master,
                                                 **_master_kwargs(settings), **kwargs)
    return client


def _tls_kwargs(settings: ConnectionSettings) -> dict[str, Any]:
    """rediss://: the TLS options Celery's clients get too (certificate required by default);
    with Sentinel, for the primary (ssl=True picks redis-py's TLS connection class)."""
    options = settings.tls_options(settings.broker_url)
    if options is None:
        return {}
    return {"ssl": True, **options} if settings.uses_sentinel else options


def _sentinel_kwargs(settings: ConnectionSettings) -> dict[str, Any]:
    # A sentinel that is down must not hold up asking the next one.
    return {"socket_timeout": 1.0, "socket_connect_timeout": 1.0,
            **settings.sentinel_kwargs()}


def _master_kwargs(settings: ConnectionSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"db": settings.redis_db()}
    if settings.redis_password is not None:
        kwargs["password"] = settings.redis_password.get_secret_value()
        if settings.redis_username:
            kwargs["username"] = settings.redis_username
    return kwargs
