"""Worker settings: the model, its device and the limits a worker enforces (CHATQUEUE_* / .env)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from producer.schemas import MAX_MESSAGES, MAX_REQUEST_BYTES
from producer.settings import DEMO_MODEL_ID, ConnectionSettings

_COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def is_commit_id(revision: str) -> bool:
    """A full git commit id, as the Hub reports them: 40 lowercase hex digits."""
    return _COMMIT_ID.fullmatch(revision) is not None


class WorkerSettings(ConnectionSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHATQUEUE_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
        protected_namespaces=(), hide_input_in_errors=True,
    )

    # --- the model and where it comes from
    model_id: str = Field(default=DEMO_MODEL_ID, description="Hub repo id of the served model.")
    model_revision: str = Field(
        default="main",
        description="Branch, tag or commit to download. A full 40-hex commit id pins it: the "
        "download refuses a mirror that resolves it to another commit, and a worker refuses a "
        "model folder whose manifest names another commit.",
    )
    model_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="Expected manifest digest (worker.manifest.manifest_digest: the sha256 of "
        "the files' sha256sum listing, printed by the download). Set: the download and the "
        "worker refuse a model folder whose digest differs.",
    )
    models_root: Path = Field(default=Path("models"), description="Folder holding model folders.")
    model_dir: Path | None = Field(
        default=None, description="The model's folder; <models_root>/<org>--<name> when unset."
    )
    hf_endpoint: str = Field(
        default="https://huggingface.co",
        validation_alias=AliasChoices("CHATQUEUE_HF_ENDPOINT", "HF_ENDPOINT"),
        description="Hub or mirror URL used by the download command (never by a running worker).",
    )
    hf_home: Path | None = Field(
        default=None, validation_alias=AliasChoices("CHATQUEUE_HF_HOME", "HF_HOME")
    )
    hf_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CHATQUEUE_HF_TOKEN", "HF_TOKEN")
    )
    download_if_missing: bool = Field(
        default=False, description="Download at start when the model folder is absent."
    )
    verify_hashes: bool = Field(
        default=True, description="Check every file's sha256 at start (size is always checked)."
    )
    trust_remote_code: bool = False

    # --- the device
    device: str = Field(
        default="auto", description="auto (cuda:0 when available, else cpu), cpu, cuda:N"
    )
    dtype: str = Field(
        default="auto", description="auto (the checkpoint's), bfloat16, float16, float32"
    )
    warmup: bool = True
    torch_threads: int | None = Field(
        default=None, gt=0,
        description="CPU threads torch uses; unset: torch's default (one per core). Set it when "
        "several workers share a CPU: oversubscribed OpenMP threads slow small matmuls ~20x.",
    )

    # --- limits a job is checked against
    max_new_tokens_cap: int = Field(default=4096, gt=0)
    default_max_new_tokens: int = Field(default=512, gt=0)
    max_prompt_tokens: int = Field(default=8192, gt=0)
    max_request_bytes: int = Field(
        default=MAX_REQUEST_BYTES, gt=0, le=MAX_REQUEST_BYTES,
        description="A request larger than this as UTF-8 JSON is refused before it is parsed.",
    )
    max_message_bytes: int | None = Field(
        default=None, gt=0,
        description="A queue entry (kombu's envelope) larger than this is refused before it is "
        "decoded: acknowledged, its job failed with limit_exceeded. Unset: 4 x "
        "max_request_bytes + 64 KiB (the body is JSON with \\u escapes, then base64: a request "
        "of 2-byte characters grows 4x). Keep Redis's proto-max-bulk-len above it.",
    )
    max_messages: int = Field(
        default=MAX_MESSAGES, gt=0, le=MAX_MESSAGES, description="Messages one request may hold."
    )

    # --- the pool and the engine
    concurrency: int = Field(
        default=32, gt=0, description="Task slots (threads) feeding the engine."
    )
    max_batch_size: int = Field(default=32, gt=0)
    max_batch_tokens: int = Field(
        default=65_536, gt=0, description="Bound on batch rows x (prompt + new tokens) in flight."
    )
    batch_wait_ms: float = Field(default=5.0, ge=0, description="How long to let a batch fill.")
    max_step_tokens: int = Field(
        default=512, gt=0,
        description="Tokens one engine step computes: every decoding row's next token plus "
        "chunks of the prompts being prefilled (chunked prefill). Larger: faster prefill, "
        "longer stalls of the decoding rows while a long prompt is prefilled.",
    )
    kv_block_size: int = Field(default=16, gt=0, description="Token positions per KV block.")
    prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV cache of prompt prefixes computed before (shared system "
        "prompts, earlier turns); usage.cached_prompt_tokens counts the hits.",
    )
    kv_cache_bytes: int | None = Field(
        default=None, gt=0,
        description="The KV pool's size in bytes; unset: on CUDA kv_cache_memory_fraction of "
        "the free memory after load, elsewhere what max_batch_tokens needs (at most 2 GiB).",
    )
    kv_cache_memory_fraction: float = Field(
        default=0.8, gt=0, lt=1, description="CUDA: share of free device memory for the KV pool."
    )
    native_kernels: bool = Field(
        default=True,
        description="CPU: decode attention by a C kernel compiled on this machine at start "
        "(reads the paged KV pool in place); off, or no C compiler: the pure-torch path.",
    )
    fast_path: bool = Field(
        default=True,
        description="CPU, Llama-family models (Llama, Mistral, Qwen2, Qwen3): the engine's own "
        "forward with weights prepacked for oneDNN (a second copy of the linear weights); off: "
        "transformers' forward.",
    )
    kernel_cache_dir: Path | None = Field(
        default=None,
        description="Where native kernel builds are kept; unset: ~/.cache/chatqueue/kernels "
        "(XDG_CACHE_HOME), else a folder in the temp directory.",
    )

    # --- delivery (README "Guarantees")
    max_job_seconds: float = Field(default=1800.0, gt=0)
    visibility_timeout_s: float = Field(
        default=3600.0, gt=0, description="Must exceed max_job_seconds or healthy jobs run twice."
    )
    redelivery_check_s: float = Field(
        default=5.0, gt=0,
        description="How often a worker looks for jobs whose worker died and puts them back in "
        "the queue: a crashed worker's job runs again visibility_timeout_s + up to this after it "
        "was first delivered.",
    )
    job_lease_ttl_s: float = Field(
        default=30.0, gt=0,
        description="A running job's lease in Redis lives this long unless its worker renews "
        "it: another delivery of the job waits while it is held, and runs the job once it "
        "lapses without a result (its worker died). Keep it below visibility_timeout_s.",
    )
    job_lease_renew_s: float = Field(
        default=10.0, gt=0, description="How often a worker renews the leases of its jobs."
    )
    shutdown_grace_s: float = Field(
        default=60.0, ge=0,
        description="On SIGTERM, how long running jobs may go on; then they are stopped and put "
        "back in the queue. Keep the orchestrator's stop timeout above it.",
    )

    log_level: str = "INFO"
    log_json: bool = Field(default=False, description="One JSON object per log line.")

    # --- observability (worker/metrics.py)
    metrics_port: int | None = Field(
        default=None, ge=0, le=65_535, description="Serve Prometheus metrics here; None: off."
    )
    metrics_addr: str = Field(
        default="127.0.0.1", description="Metrics listen address; 0.0.0.0 inside a container."
    )

    @model_validator(mode="after")
    def _check(self) -> WorkerSettings:
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens_cap ({self.max_new_tokens_cap})"
            )
        if self.visibility_timeout_s <= self.max_job_seconds:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must be longer than "
                f"max_job_seconds ({self.max_job_seconds}): Redis would hand a healthy running "
                "job to a second worker"
            )
        if self.job_lease_renew_s >= self.job_lease_ttl_s:
            raise ValueError(
                f"job_lease_renew_s ({self.job_lease_renew_s}) must be shorter than "
                f"job_lease_ttl_s ({self.job_lease_ttl_s}): leases would lapse between renewals"
            )
        if self.job_lease_ttl_s >= self.visibility_timeout_s:
            raise ValueError(
                f"job_lease_ttl_s ({self.job_lease_ttl_s}) must be shorter than "
                f"visibility_timeout_s ({self.visibility_timeout_s}): a dead worker's job, "
                "delivered again, would wait for its lease to lapse"
            )
        return self

    @field_validator("model_revision", "model_sha256", mode="before")
    @classmethod
    def _strip(cls, value: object, info: ValidationInfo) -> object:
        # Hex ids pasted from other tools come in upper case or with spaces around them.
        if not isinstance(value, str):
            return value
        value = value.strip()
        if not value and info.field_name == "model_sha256":
            return None  # compose passes an unset variable as an empty one
        return value.lower() if re.fullmatch(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}", value) else value

    @property
    def pinned_commit(self) -> str | None:
        """model_revision when it is a full commit id, else None (a branch or tag moves)."""
        return self.model_revision if is_commit_id(self.model_revision) else None

    @property
    def message_byte_limit(self) -> int:
        """The largest queue entry this worker decodes (max_message_bytes, or derived)."""
        return self.max_message_bytes or 4 * self.max_request_bytes + 65_536

    @property
    def serving_queue(self) -> str:
        return self.queue_for(self.model_id)

    @property
    def resolved_model_dir(self) -> Path:
        return self.model_dir or self.models_root / self.model_id.replace("/", "--")
