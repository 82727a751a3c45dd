"""The gateway's settings, from CHATQUEUE_GATEWAY_* variables or .env. How it reaches Redis
and where jobs go are the producer's own settings (CHATQUEUE_*)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_DIGEST_PREFIX = "sha256:"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHATQUEUE_GATEWAY_", env_file=".env", env_file_encoding="utf-8",
        extra="ignore", hide_input_in_errors=True,
    )

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: SecretStr | None = Field(
        default=None, description="Comma-separated API keys (or sha256:<hex> digests of them).")
    api_keys_file: Path | None = Field(
        default=None, description="A file of API keys or sha256:<hex> digests, one a line.")
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="Refused (413) above this.")
    max_queue_length: int = Field(
        default=1000, ge=0,
        description="A model whose queue holds more jobs than this gets 429 (load shedding).")
    request_timeout_s: float = Field(default=600.0, gt=0, description="Longest wait for a job.")
    files_dir: Path = Field(
        default=Path("gateway-files"),
        description="Where uploaded batch input files are kept (a volume in compose).")
    max_file_bytes: int = Field(default=512 << 20, gt=0,
                                description="Largest batch input file accepted (413 above).")
    models_cache_s: float = Field(
        default=1.0, ge=0, description="How long a read of the live workers is reused.")
    workers: int = Field(
        default=1, ge=1, le=64,
        description="Gateway processes serving the port, each with its own event loop "
                    "(uvicorn's workers); above 1, /metrics counts what all of them served.")
    queue_length_cache_s: float = Field(
        default=0.25, ge=0,
        description="How long a read of a queue's length is reused (with the jobs this gateway "
                    "queued since counted on top) for the 429 bound.")

    def key_digests(self) -> tuple[bytes, ...]:
        """The API keys as sha256 digests: the keys themselves are not kept."""
        lines: list[str] = []
        if self.api_keys is not None:
            lines += self.api_keys.get_secret_value().split(",")
        if self.api_keys_file is not None:
            lines += self.api_keys_file.read_text(encoding="utf-8").splitlines()
        digests = []
        for line in (line.strip() for line in lines):
            if not line or line.startswith("#"):
                continue
            if line.startswith(_DIGEST_PREFIX):
                digests.append(bytes.fromhex(line.removeprefix(_DIGEST_PREFIX)))
            else:
                digests.append(key_digest(line))
        return tuple(digests)

    def listens_beyond_loopback(self) -> bool:
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_matches(presented: str, digests: tuple[bytes, ...]) -> bool:
    """Constant time in the key's content: every stored digest is compared, all of it."""
    candidate, found = key_digest(presented), False
    for digest in digests:
        found |= hmac.compare_digest(candidate, digest)
    return found
