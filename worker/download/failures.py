"""How a download fails: retries of transient faults, one clear sentence for the rest, and the
rule that keeps the Hub token off clear-text connections."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from pydantic import SecretStr

from producer.errors import ChatQueueError

log = logging.getLogger(__name__)

# Bounds that make a dead or silent mirror fail in seconds rather than hang: connection refused
# costs ~0.5+1+2+4 s of backoff over 5 attempts; a black hole at most 5 x 10 s on top.
REQUEST_TIMEOUT_S = 10.0
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 8.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")


class DownloadError(ChatQueueError, RuntimeError):
    """A download that cannot succeed as asked; the message names repo, revision and endpoint."""


def refuse_token_in_clear(endpoint: str, token: SecretStr | None) -> None:
    """A Hub token goes only to an https endpoint, or over loopback (it never leaves the host).

    Over plain http anyone on the path reads it, and it grants what the account can do on the
    real Hub, not only on the mirror.
    """
    if token is None:
        return
    url = urlsplit(endpoint)
    if url.scheme == "https" or (url.scheme == "http" and is_loopback(url.hostname)):
        return
    raise DownloadError(
        f"HF_TOKEN is set, but the endpoint {endpoint!r} (HF_ENDPOINT / --endpoint) is not "
        "https: the token would cross the network in clear text. Use an https endpoint, or "
        "unset HF_TOKEN for a mirror that needs none"
    )


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":  # RFC 6761: always the loopback interface
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- retries


def with_retries(action: Callable[[], T], where: str, max_attempts: int) -> T:
    """Run `action`, retrying connection errors and 5xx with exponential backoff."""
    delay = _FIRST_BACKOFF_S
    for attempt in range(1, max_attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt >= max_attempts or not is_transient(exc):
                raise
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1f s",
                where,
                attempt,
                max_attempts,
                first_line(exc),
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF_S)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    # The hub wraps network errors (e.g. LocalEntryNotFoundError from a ConnectError).
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    for cause in _causes(exc):
        if isinstance(
            cause, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
        ):
            return True
        if isinstance(cause, HfHubHTTPError) and cause.response.status_code in _TRANSIENT_STATUS:
            return True
    return False


def first_line(exc: BaseException) -> str:
    # Hub errors carry request ids and hints on further lines; one line keeps messages readable.
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# --------------------------------------------------------------------------- explanations


def explain(exc: BaseException, *, api: HfApi, repo_id: str, revision: str,
            where: str) -> DownloadError:
    """One clear sentence naming what failed: the repo, the revision or the mirror."""
    head = f"cannot download {where}"
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(f"{head}: this process is in offline mode (HF_HUB_OFFLINE is set)")
    if is_transient(exc):
        return DownloadError(
            f"{head}: the mirror did not answer ({first_line(exc)}); is it "
            "running and is the endpoint right?"
        )
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(f"{head}: revision {revision!r} not found{_known_refs(api, repo_id)}")
    if isinstance(exc, GatedRepoError):
        return DownloadError(
            f"{head}: repository {repo_id} is gated; set HF_TOKEN to a token "
            "that was granted access"
        )
    if isinstance(exc, RepositoryNotFoundError):
        # olah answers an unknown revision of a known repo with RepoNotFound: tell them apart.
        refs = _known_refs(api, repo_id)
        if refs:
            return DownloadError(f"{head}: revision {revision!r} not found{refs}")
        return DownloadError(
            f"{head}: repository {repo_id} not found (or private and no valid token was given)"
        )
    if isinstance(exc, HfHubHTTPError) and exc.response.status_code in (401, 403):
        status = exc.response.status_code
        return DownloadError(f"{head}: access denied (HTTP {status}); check HF_TOKEN")
    if isinstance(exc, EntryNotFoundError):
        return DownloadError(f"{head}: a listed file is missing on the mirror ({first_line(exc)})")
    return DownloadError(f"{head}: {first_line(exc)}")


def _known_refs(api: HfApi, repo_id: str) -> str:
    """`` (branches: ...; tags: ...)`` when the repo exists, else an empty string."""
    try:
        refs = api.list_repo_refs(repo_id)
    except (httpx2.HTTPError, OfflineModeIsEnabled):
        return ""
    branches = ", ".join(ref.name for ref in refs.branches) or "none"
    tags = ", ".join(ref.name for ref in refs.tags) or "none"
    return f" in {repo_id} (branches: {branches}; tags: {tags})"
