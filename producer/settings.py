"""Settings shared by everything that talks to the queue, from CHATQUEUE_* variables or .env."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.schemas import MAX_REQUEST_BYTES

TASK_NAME = "chatqueue.generate_chat"
QUEUE_PREFIX = "chatqueue."
DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CANCEL_CHANNEL = "chatqueue:cancel"


def stream_key(job_id: str) -> str:
    return f"chatqueue:stream:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"chatqueue:cancelled:{job_id}"


def accepted_key(job_id: str) -> str:
    """The job record: written by the producer before it publishes a job (SET NX, for
    result_ttl_s; a worker extends it when the job ends, so it outlives the result). It tells a
    queued job from an unknown or expired one, whose result would otherwise read PENDING
    forever, and holds "<state> <request digest>" (state: pending until the publish returned,
    then queued), so a job id names one request."""
    return f"chatqueue:accepted:{job_id}"


# Live workers: a sorted set of presence_member(...) scored by when each entry lapses
# (worker/presence.py renews it while the worker consumes its queue).
PRESENCE_KEY = "chatqueue:workers"
PRESENCE_TTL_S = 15.0


def presence_member(node: str, model_id: str, queue: str) -> str:
    return json.dumps({"node": node, "model": model_id, "queue": queue}, sort_keys=True)


# What a rediss:// URL's ssl_cert_reqs may say (kombu's, Celery's and redis-py's spellings).
CERT_REQS = {"required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED,
             "optional": ssl.CERT_OPTIONAL, "cert_optional": ssl.CERT_OPTIONAL,
             "none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE}
# TLS parameters a Redis URL may carry in its query; taken out of the URL and applied as
# explicit options, so every client (kombu, Celery's result backend, redis-py) gets the same.
TLS_QUERY_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def lease_key(job_id: str) -> str:
    """Held by the one worker running the job (its token, with a TTL it renews while it runs):
    another delivery of the job waits instead of running it too."""
    return f"chatqueue:lease:{job_id}"


class ConnectionSettings(BaseSettings):
    """How to reach Redis and where jobs go. The worker's settings extend these."""

    model_config = SettingsConfigDict(
        env_prefix="CHATQUEUE_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
        # A refused value is not echoed: it may be a password (or hold one, in a URL).
        hide_input_in_errors=True,
    )

    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis URL without the password (redis:// or rediss:// for TLS).",
    )
    result_backend: str | None = Field(
        default=None, description="Redis URL for results; the broker URL when unset."
    )
    redis_username: str | None = Field(
        default=None,
        description="Redis ACL user of this side (producer, worker, ...; README \"Security\"); "
        "unset: the URL's user, else Redis's default user.",
    )
    redis_password: SecretStr | None = Field(
        default=None, description="Kept apart from the URLs so it is never logged with them."
    )
    redis_sentinels: str | None = Field(
        default=None,
        description="Redis Sentinel: the sentinels' addresses, host:port,host:port,... When set, "
        "every connection (Celery's broker and results, streams, cancels, job records, leases) "
        "asks them for the current primary of redis_sentinel_master and follows a failover; "
        "the broker URL then only gives the database number (and result_backend stays unset).",
    )
    redis_sentinel_master: str = Field(
        default="chatqueue", description="The name the sentinels monitor the primary under."
    )
    redis_sentinel_username: str | None = Field(
        default=None,
        description="The sentinels' ACL user for clients (compose's sentinel.sh: \"client\", "
        "which may only ask for the primary, replicas and sentinels); unset: their default user.",
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="That user's password on the sentinels, if any."
    )
    redis_sentinel_tls: bool | None = Field(
        default=None,
        description="Ask the sentinels over TLS, verified with the same CA as Redis "
        "(redis_ca_file, else the URL's ssl_ca_certs or the system's CAs) and the host name "
        "of each sentinel address. Unset: as the data connection (rediss:// -> TLS).",
    )
    redis_ca_file: Path | None = Field(
        default=None,
        description="rediss://: a PEM bundle of the CA(s) that sign Redis's certificate; unset: "
        "the system's trusted CAs (or the URL's ssl_ca_certs). The certificate and its host "
        "name are verified on every connection, producer and worker alike.",
    )
    redis_tls_allow_unverified: bool = Field(
        default=False,
        description="Let a rediss:// URL turn the certificate check off or make it optional "
        "(?ssl_cert_reqs=none / optional): anyone on the path could then read and forge jobs. "
        "Off: such a URL is refused at start.",
    )
    queue: str | None = Field(
        default=None,
        description="One queue for every job whatever its model; unset: a queue per model, "
        "chatqueue.<model id>, so one Redis serves several models.",
    )
    result_ttl_s: int = Field(default=86_400, gt=0, description="How long results stay in Redis.")
    log_content: bool = Field(
        default=False,
        description="Debug only: let prompts and generated text into logs and task events "
        "(Flower). Off: they appear only in the result and the stream.",
    )
    stream_maxlen: int = Field(default=10_000, gt=0, description="Entries kept per job stream.")

    @field_validator("redis_password", "redis_sentinel_password", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        # compose passes an optional secret that .env leaves out as "" (`${VAR:-}`).
        return None if value == "" else value

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for address in value.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("redis_sentinels: expected host:port[,host:port...]")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ConnectionSettings:
        for name in ("broker_url", "result_backend"):
            url = getattr(self, name)
            if url is not None:
                self.tls_options(url, checking=name)
        return self

    def tls_options(self, url: str, checking: str | None = None) -> dict[str, Any] | None:
        """redis-py's TLS options for `url` (kombu's broker_use_ssl, Celery's
        redis_backend_use_ssl and our own clients take the same keys); None unless rediss://.
        The certificate is required unless the URL says otherwise and redis_tls_allow_unverified
        lets it; ValueError otherwise."""
        parts = urlsplit(url)
        if parts.scheme != "rediss":
            return None
        query = {key: unquote(value) for key, value in parse_qsl(parts.query)}
        where = f"{checking}: " if checking else ""
        asked = query.get("ssl_cert_reqs", "required")
        mode = CERT_REQS.get(asked.lower())
        if mode is None:
            raise ValueError(f"{where}ssl_cert_reqs must be one of required, optional, none "
                             f"(got {asked[:20]!r})")
        if mode != ssl.CERT_REQUIRED and not self.redis_tls_allow_unverified:
            raise ValueError(
                f"{where}ssl_cert_reqs={asked[:20]} turns off the check of Redis's certificate "
                "(anyone on the path could read and forge jobs): refused unless "
                "CHATQUEUE_REDIS_TLS_ALLOW_UNVERIFIED=true. To trust a private CA, set "
                "CHATQUEUE_REDIS_CA_FILE instead.")
        ca_file = self.redis_ca_file or query.get("ssl_ca_certs")
        if ca_file is not None and not Path(ca_file).is_file():
            raise ValueError(f"{where}the CA bundle {str(ca_file)[:200]} is not a file "
                             "(CHATQUEUE_REDIS_CA_FILE)")
        options: dict[str, Any] = {"ssl_cert_reqs": mode}
        if ca_file is not None:
            options["ssl_ca_certs"] = str(ca_file)
        for key in ("ssl_certfile", "ssl_keyfile"):
            if query.get(key):
                options[key] = query[key]
        if mode == ssl.CERT_NONE:
            options["ssl_check_hostname"] = False  # Python refuses a host check without one
        return options

    def queue_for(self, model_id: str) -> str:
        return self.queue or f"{QUEUE_PREFIX}{model_id}"

    @property
    def uses_sentinel(self) -> bool:
        return self.redis_sentinels is not None

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        addresses = []
        for address in (self.redis_sentinels or "").split(","):
            host, _, port = address.strip().rpartition(":")
            addresses.append((host.strip("[]"), int(port)))
        return addresses

    def redis_db(self) -> int:
        path = urlsplit(self.broker_url).path.strip("/")
        return int(path) if path.isdigit() else 0

    def sentinel_tls_options(self) -> dict[str, Any] | None:
        """redis-py's TLS options for the sentinels themselves; None: plain TCP. They follow
        the data connection unless redis_sentinel_tls says otherwise: the sentinels hand out
        the primary's address and take a password, so they deserve the same protection, and
        one CA serves both (redis-server's tls-* options are the same on a sentinel)."""
        data = self.tls_options(self.broker_url)
        wanted = self.redis_sentinel_tls if self.redis_sentinel_tls is not None else (
            data is not None)
        if not wanted:
            return None
        if data is None:  # TLS to the sentinels only: verified, against the CA file if given
            data = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
            if self.redis_ca_file is not None:
                data["ssl_ca_certs"] = str(self.redis_ca_file)
        return {"ssl": True, **data}

    def sentinel_kwargs(self) -> dict[str, Any]:
        """How to reach and log in to the sentinels themselves (not Redis): redis-py's Sentinel,
        kombu's broker transport and Celery's result backend all take these."""
        kwargs: dict[str, Any] = dict(self.sentinel_tls_options() or {})
        if self.redis_sentinel_username:
            kwargs["username"] = self.redis_sentinel_username
        if self.redis_sentinel_password is not None:
            kwargs["password"] = self.redis_sentinel_password.get_secret_value()
        return kwargs

    def sentinel_transport_options(self) -> dict[str, Any]:
        """kombu's and Celery's Sentinel options (broker and result backend alike); {} without
        Sentinel."""
        if not self.uses_sentinel:
            return {}
        return {"master_name": self.redis_sentinel_master,
                "sentinel_kwargs": self.sentinel_kwargs()}

    def broker_connection_url(self) -> str:
        if self.uses_sentinel:
            return self._sentinel_url()
        return _with_password(self.broker_url, self.redis_username, self.redis_password)

    def backend_connection_url(self) -> str:
        if self.uses_sentinel:
            return self._sentinel_url()
        return _with_password(self.result_backend or self.broker_url, self.redis_username,
                              self.redis_password)

    def _sentinel_url(self) -> str:
        """`sentinel://[user:pass@]host:port/db;sentinel://...`: kombu's and Celery's form. The
        credentials are Redis's (the primary's), as for redis://; the sentinels' own go in
        sentinel_kwargs."""
        if self.result_backend is not None:
            raise ValueError("with redis_sentinels set, leave result_backend unset: results go "
                             "to the primary the sentinels name")
        db = self.redis_db()
        return ";".join(
            _with_password(f"sentinel://{_host(host)}:{port}/{db}", self.redis_username,
                           self.redis_password)
            for host, port in self.sentinel_addresses())


class ProducerSettings(ConnectionSettings):
    default_model: str = Field(
        default=DEMO_MODEL_ID, description="Where a request that names no model goes."
    )
    wait_timeout_s: float = Field(default=600.0, gt=0, description="Default wait for a result.")
    max_request_bytes: int = Field(
        default=MAX_REQUEST_BYTES, gt=0, le=MAX_REQUEST_BYTES,
        description="A request larger than this as UTF-8 JSON is refused before it is published "
        "(JobFailed, limit_exceeded); keep it at or under the workers' own limit.",
    )
    submit_min_replicas: int = Field(
        default=0, ge=0,
        description="submit() returns only once the job's message and record are on at least "
        "this many replicas (Redis WAIT): a failover then cannot lose an accepted job. 0: "
        "returns once the primary has it (asynchronous replication may lose the last writes).",
    )
    submit_replica_timeout_s: float = Field(
        default=5.0, gt=0,
        description="How long one submit waits for submit_min_replicas; short of them, it "
        "publishes again and finally raises (the job is not accepted).",
    )


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _without_tls_query(url: str) -> str:
    """The URL less its TLS parameters (ConnectionSettings.tls_options applies them)."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    kept = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True)
            if key not in TLS_QUERY_KEYS]
    return urlunsplit(parts._replace(query=urlencode(kept)))


def _with_password(url: str, username: str | None, password: SecretStr | None) -> str:
    url = _without_tls_query(url)
    if password is None:
        return url
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    user = username or parts.username or ""
    netloc = f"{quote(user, safe='')}:{quote(password.get_secret_value(), safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))
