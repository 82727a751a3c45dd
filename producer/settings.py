"""Settings shared by everything that talks to the queue, from CHATQUEUE_* variables or .env."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    def queue_for(self, model_id: str) -> str:
        return self.queue or f"{QUEUE_PREFIX}{model_id}"

    def broker_connection_url(self) -> str:
        return _with_password(self.broker_url, self.redis_username, self.redis_password)

    def backend_connection_url(self) -> str:
        return _with_password(self.result_backend or self.broker_url, self.redis_username,
                              self.redis_password)


class ProducerSettings(ConnectionSettings):
    default_model: str = Field(
        default=DEMO_MODEL_ID, description="Where a request that names no model goes."
    )
    wait_timeout_s: float = Field(default=600.0, gt=0, description="Default wait for a result.")


def _with_password(url: str, username: str | None, password: SecretStr | None) -> str:
    if password is None:
        return url
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    user = username or parts.username or ""
    netloc = f"{quote(user, safe='')}:{quote(password.get_secret_value(), safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))
