"""Fetch a model through a Hub mirror, verify it, and write its manifest; check it at worker start.

`download_model` is the only code in chatqueue that talks to a Hub. A worker never does: it calls
`ensure_model`, which puts the process in offline mode and verifies the folder against its
manifest. The manifest is written last, so its presence means the folder is complete.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils import tqdm as hf_tqdm
from pydantic import SecretStr, ValidationError

from worker.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    ModelNotReady,
    git_blob_id,
    list_model_files,
    sha256_file,
    verify_model_dir,
    write_manifest,
)
from worker.offline import OFFLINE_VARIABLES, enter_offline_mode
from worker.settings import WorkerSettings

# Named, not __name__: run as `python -m worker.download` the module is __main__.
log = logging.getLogger("worker.download")

# What a worker needs to load a chat model; other weight formats (.bin, .pth, .onnx, .gguf, .h5,
# .msgpack) would only double the download.
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "*.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)

# Bounds that make a dead or silent mirror fail in seconds rather than hang: connection refused
# costs ~0.5+1+2+4 s of backoff over 5 attempts; a black hole at most 5 x 10 s on top.
_REQUEST_TIMEOUT_S = 10.0
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 8.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Kept apart from the hub's own .cache/huggingface so that the two never collide.
_LOCK_NAME = "chatqueue-download.lock"

T = TypeVar("T")


class DownloadError(RuntimeError):
    """A download that cannot succeed as asked; the message names repo, revision and endpoint."""


@dataclass(frozen=True)
class RemoteFile:
    """A file as the mirror lists it at one commit: what the local copy must match."""

    path: str
    size: int
    blob_id: str
    lfs_sha256: str | None

    @classmethod
    def from_repo_file(cls, entry: RepoFile) -> RemoteFile:
        if entry.lfs is not None:
            return cls(entry.path, entry.lfs.size, entry.blob_id, entry.lfs.sha256)
        return cls(entry.path, entry.size, entry.blob_id, None)


# --------------------------------------------------------------------------- download


def download_model(
    *,
    repo_id: str,
    revision: str,
    endpoint: str,
    local_dir: Path,
    hf_home: Path | None = None,
    token: SecretStr | None = None,
    allow_patterns: Sequence[str] | None = None,
    all_files: bool = False,
    max_attempts: int = 5,
    progress: bool = True,
) -> Manifest:
    """Download `repo_id` at `revision` into `local_dir`, verify every file, write the manifest.

    Files already complete in `local_dir` are not fetched again, so an interrupted run is resumed
    by running it again. Raises DownloadError when the download cannot succeed as asked.
    """
    request = _Request(
        repo_id=repo_id,
        revision=revision,
        endpoint=endpoint,
        local_dir=local_dir.expanduser().resolve(),
        hf_home=hf_home,
        # Only a token configured for chatqueue is sent: the mirror is a third party, and a token
        # the hub would otherwise take from its own login file is not meant for it.
        api=HfApi(endpoint=endpoint, token=token.get_secret_value() if token else False),
        patterns=None if all_files else list(allow_patterns or DEFAULT_ALLOW_PATTERNS),
        progress=progress and sys.stderr.isatty(),
        max_attempts=max_attempts,
    )
    request.local_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive_download_lock(request.local_dir):
            return _download_locked(request)
    except (httpx2.HTTPError, OfflineModeIsEnabled, EntryNotFoundError) as exc:
        raise _explain(exc, request) from exc


@dataclass(frozen=True)
class _Request:
    repo_id: str
    revision: str
    endpoint: str
    local_dir: Path
    hf_home: Path | None
    api: HfApi
    patterns: list[str] | None
    progress: bool
    max_attempts: int

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision} from {self.endpoint}"

    def retried(self, action: Callable[[], T]) -> T:
        return _with_retries(action, self.where, self.max_attempts)


def _download_locked(request: _Request) -> Manifest:
    api, repo_id, local_dir = request.api, request.repo_id, request.local_dir
    commit = request.retried(lambda: _resolve_commit(api, repo_id, request.revision))
    listing = request.retried(lambda: _list_files(api, repo_id, commit))
    wanted = _select(listing, request.patterns)
    if not wanted:
        raise DownloadError(f"cannot download {request.where}: no file matches {request.patterns}")
    # From here on the folder changes: it must not claim to be complete until verified again.
    (local_dir / MANIFEST_NAME).unlink(missing_ok=True)
    _remove_stale_partials(local_dir)
    files = _fetch_and_verify(
        lambda: request.retried(lambda: _snapshot(request, commit)),
        local_dir,
        wanted,
        request.where,
    )
    manifest = Manifest(
        repo_id=repo_id,
        revision=request.revision,
        commit=commit,
        endpoint=request.endpoint,
        created_at=datetime.now(UTC),
        files=files,
    )
    _warn_about_extra_files(local_dir, manifest)
    write_manifest(local_dir, manifest)
    log.info("%s (commit %s) is complete in %s", request.where, commit, local_dir)
    return manifest


@contextmanager
def _exclusive_download_lock(local_dir: Path) -> Iterator[None]:
    """One download per folder at a time; a second one (another worker on the host) waits.

    The kernel drops the lock when its holder dies, kill -9 included, so it never goes stale.
    """
    lock_dir = local_dir / ".cache"
    lock_dir.mkdir(exist_ok=True)
    with (lock_dir / _LOCK_NAME).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another download into %s is running; waiting for it", local_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _resolve_commit(api: HfApi, repo_id: str, revision: str) -> str:
    # olah answers RepositoryNotFound unless the revision is explicit, so always pass one.
    info = api.model_info(repo_id, revision=revision, timeout=_REQUEST_TIMEOUT_S)
    if not info.sha:
        raise DownloadError(f"the mirror did not report a commit for {repo_id}@{revision}")
    return info.sha


def _list_files(api: HfApi, repo_id: str, commit: str) -> list[RemoteFile]:
    tree = api.list_repo_tree(repo_id, revision=commit, recursive=True)
    return [RemoteFile.from_repo_file(entry) for entry in tree if isinstance(entry, RepoFile)]


def _select(listing: list[RemoteFile], patterns: list[str] | None) -> list[RemoteFile]:
    chosen = filter_repo_objects(
        listing, allow_patterns=patterns, ignore_patterns=[MANIFEST_NAME], key=lambda f: f.path
    )
    return sorted(chosen, key=lambda f: f.path)


def _remove_stale_partials(local_dir: Path) -> None:
    """Drop what a killed download left: the hub names partial files per process, never reuses them.

    Safe only while holding the folder's download lock (no other download writes them).
    """
    for partial in (local_dir / ".cache" / "huggingface" / "download").rglob("*.incomplete"):
        log.info("removing a partial file left by an interrupted download: %s", partial.name)
        partial.unlink(missing_ok=True)


def _snapshot(request: _Request, commit: str) -> None:
    # Passing the commit (not the branch) pins every file to one snapshot and lets the hub skip
    # files its local_dir metadata marks complete at that commit without asking the mirror.
    snapshot_download(
        request.repo_id,
        revision=commit,
        local_dir=request.local_dir,
        # An explicit cache_dir instead of HF_HOME in the environment: the hub reads its env
        # constants once, at import. It copies a file from there when the cache already has it.
        cache_dir=request.hf_home / "hub" if request.hf_home else None,
        endpoint=request.endpoint,
        token=request.api.token,
        allow_patterns=request.patterns,
        ignore_patterns=[MANIFEST_NAME],
        etag_timeout=_REQUEST_TIMEOUT_S,
        tqdm_class=None if request.progress else _SilentTqdm,
    )


class _SilentTqdm(hf_tqdm):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _fetch_and_verify(
    fetch: Callable[[], None], local_dir: Path, wanted: list[RemoteFile], where: str
) -> list[ManifestFile]:
    """Fetch, then check every file against the mirror's listing; refetch bad files once.

    The hub skips a file whose metadata says it is complete without looking at its bytes, so a
    file damaged after it was written (disk, crash, hand edit) would stay damaged: deleting it
    makes the next fetch bring it again.
    """
    fetch()
    entries, bad = _verify_files(local_dir, wanted)
    if bad:
        log.warning("refetching files that fail verification: %s", _listing(bad))
        for path in bad:
            (local_dir / path).unlink(missing_ok=True)
        fetch()
        entries, bad = _verify_files(local_dir, wanted)
    if bad:
        raise DownloadError(
            f"downloaded {where} but files do not match what the mirror lists: {_listing(bad)}"
        )
    return entries


def _verify_files(
    local_dir: Path, wanted: list[RemoteFile]
) -> tuple[list[ManifestFile], dict[str, str]]:
    """Manifest entries for the good files, and what is wrong with each bad one."""
    entries: list[ManifestFile] = []
    bad: dict[str, str] = {}
    for remote in wanted:
        entry_or_problem = _verify_file(local_dir / remote.path, remote)
        if isinstance(entry_or_problem, str):
            bad[remote.path] = entry_or_problem
        else:
            entries.append(entry_or_problem)
    return entries, bad


def _verify_file(path: Path, remote: RemoteFile) -> ManifestFile | str:
    if not path.is_file():
        return "missing"
    if (size := path.stat().st_size) != remote.size:
        return f"size {size} bytes, expected {remote.size}"
    sha256 = sha256_file(path)
    lfs = remote.lfs_sha256 is not None
    if lfs and sha256 != remote.lfs_sha256:
        return f"sha256 {sha256[:12]}..., expected {remote.lfs_sha256}"
    # Non-LFS files: the mirror gives only their git blob id, so check that one.
    if not lfs and (blob := git_blob_id(path)) != remote.blob_id:
        return f"git blob {blob[:12]}..., expected {remote.blob_id}"
    return ManifestFile(
        path=remote.path, size=size, sha256=sha256, lfs=lfs, blob_id=None if lfs else remote.blob_id
    )


def _listing(bad: dict[str, str]) -> str:
    return "; ".join(f"{path}: {problem}" for path, problem in bad.items())


def _warn_about_extra_files(local_dir: Path, manifest: Manifest) -> None:
    # Left alone rather than deleted: they may be an operator's; the manifest says what counts.
    listed = {entry.path for entry in manifest.files}
    extra = [path for path in list_model_files(local_dir) if path not in listed]
    if extra:
        log.warning(
            "%s holds files outside the manifest (not verified, not used): %s",
            local_dir,
            ", ".join(extra),
        )


# --------------------------------------------------------------------------- retries and errors


def _with_retries(action: Callable[[], T], where: str, max_attempts: int) -> T:
    """Run `action`, retrying connection errors and 5xx with exponential backoff."""
    delay = _FIRST_BACKOFF_S
    for attempt in range(1, max_attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt >= max_attempts or not _is_transient(exc):
                raise
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1f s",
                where,
                attempt,
                max_attempts,
                _first_line(exc),
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


def _is_transient(exc: BaseException) -> bool:
    for cause in _causes(exc):
        if isinstance(
            cause, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
        ):
            return True
        if isinstance(cause, HfHubHTTPError) and cause.response.status_code in _TRANSIENT_STATUS:
            return True
    return False


def _first_line(exc: BaseException) -> str:
    # Hub errors carry request ids and hints on further lines; one line keeps messages readable.
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _explain(exc: BaseException, request: _Request) -> DownloadError:
    """One clear sentence naming what failed: the repo, the revision or the mirror."""
    api, repo_id, revision = request.api, request.repo_id, request.revision
    head = f"cannot download {request.where}"
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(f"{head}: this process is in offline mode (HF_HUB_OFFLINE is set)")
    if _is_transient(exc):
        return DownloadError(
            f"{head}: the mirror did not answer ({_first_line(exc)}); is it "
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
        return DownloadError(f"{head}: a listed file is missing on the mirror ({_first_line(exc)})")
    return DownloadError(f"{head}: {_first_line(exc)}")


def _known_refs(api: HfApi, repo_id: str) -> str:
    """`` (branches: ...; tags: ...)`` when the repo exists, else an empty string."""
    try:
        refs = api.list_repo_refs(repo_id)
    except (httpx2.HTTPError, OfflineModeIsEnabled):
        return ""
    branches = ", ".join(ref.name for ref in refs.branches) or "none"
    tags = ", ".join(ref.name for ref in refs.tags) or "none"
    return f" in {repo_id} (branches: {branches}; tags: {tags})"


# --------------------------------------------------------------------------- worker start


def fetch_command(settings: WorkerSettings) -> str:
    """The command an operator runs to fetch the model these settings name."""
    return shlex.join(["chatqueue-worker", "download", *_download_args(settings)])


def _download_args(settings: WorkerSettings) -> list[str]:
    args = [
        "--model-id",
        settings.model_id,
        "--revision",
        settings.model_revision,
        "--endpoint",
        settings.hf_endpoint,
        "--model-dir",
        str(settings.resolved_model_dir),
    ]
    if settings.hf_home is not None:
        args += ["--hf-home", str(settings.hf_home)]
    return args


def ensure_model(settings: WorkerSettings) -> Manifest:
    """The worker-start check: offline from here on, and the model folder verified.

    With download_if_missing, a folder without a manifest (absent, or left by an interrupted
    download) is fetched first -- in a child process. That child is the only network access a
    worker makes: this process turns offline before it starts and never goes online again.
    """
    enter_offline_mode()
    model_dir = settings.resolved_model_dir
    hint = f"Fetch it with: {fetch_command(settings)}"
    if settings.download_if_missing and not (model_dir / MANIFEST_NAME).is_file():
        _download_in_child(settings, hint)
    return verify_model_dir(model_dir, fetch_hint=hint, check_hashes=settings.verify_hashes)


def _download_in_child(settings: WorkerSettings, hint: str) -> None:
    # A child rather than flipping offline mode off and on here: the hub reads its environment
    # once at import and transformers may already be imported; a child starts with a clean,
    # online hub and takes its network state with it when it exits.
    argv = [sys.executable, "-m", "worker.download", *_download_args(settings)]
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    # The token travels in the environment, never in argv (visible to every local user in ps).
    env.pop("HF_TOKEN", None)
    env.pop("CHATQUEUE_HF_TOKEN", None)
    if settings.hf_token is not None:
        env["CHATQUEUE_HF_TOKEN"] = settings.hf_token.get_secret_value()
    log.info(
        "model folder %s is not complete; downloading %s@%s from %s",
        settings.resolved_model_dir,
        settings.model_id,
        settings.model_revision,
        settings.hf_endpoint,
    )
    status = subprocess.run(argv, env=env, check=False).returncode
    if status != 0:
        raise ModelNotReady(
            f"downloading {settings.model_id}@{settings.model_revision} from "
            f"{settings.hf_endpoint} failed (exit status {status}; its message is above). {hint}"
        )


# --------------------------------------------------------------------------- command line


def _parser(settings: WorkerSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatqueue-worker download",
        description="Download a model through a Hub mirror into its folder, verify it and "
        "write its manifest. A run that was interrupted is finished by running it again. "
        "The token is read from HF_TOKEN / CHATQUEUE_HF_TOKEN only.",
    )
    parser.add_argument("--model-id", default=settings.model_id)
    parser.add_argument(
        "--revision",
        default=settings.model_revision,
        help="branch, tag or commit (default: %(default)s)",
    )
    parser.add_argument(
        "--endpoint", default=settings.hf_endpoint, help="Hub or mirror URL (default: %(default)s)"
    )
    parser.add_argument(
        "--hf-home",
        type=Path,
        default=settings.hf_home,
        help="Hub cache root; files already there are copied, not fetched",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="default: CHATQUEUE_MODEL_DIR, else <models_root>/<org>--<name>",
    )
    parser.add_argument(
        "--all-files",
        action="store_true",
        help="every file of the repo, not only what a worker needs",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing, without any network access, when the folder already holds this "
        "repo and revision and verifies (what a compose init service wants on every start)",
    )
    return parser


def _already_there(model_dir: Path, repo_id: str, revision: str) -> Manifest | None:
    try:
        manifest = verify_model_dir(model_dir)
    except ModelNotReady:
        return None
    same = manifest.repo_id == repo_id and revision in (manifest.revision, manifest.commit)
    return manifest if same else None


def main(argv: list[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # One INFO line per HTTP request drowns ours; the progress bar shows the transfer.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        print(f"error: invalid worker settings: {exc}", file=sys.stderr)
        return 2
    args = _parser(settings).parse_args(argv)
    # The default folder follows --model-id, not the model id of the settings.
    named = settings.model_copy(update={"model_id": args.model_id})
    model_dir = args.model_dir or named.resolved_model_dir
    if args.if_missing and (manifest := _already_there(model_dir, args.model_id, args.revision)):
        print(f"model dir: {model_dir} already holds {manifest.repo_id}@{manifest.commit}")
        return 0
    try:
        manifest = download_model(
            repo_id=args.model_id,
            revision=args.revision,
            endpoint=args.endpoint,
            local_dir=model_dir,
            hf_home=args.hf_home,
            token=settings.hf_token,
            all_files=args.all_files,
            progress=not args.no_progress,
        )
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = sum(entry.size for entry in manifest.files)
    print(f"model dir: {model_dir.expanduser().resolve()}")
    print(f"commit:    {manifest.commit} ({manifest.repo_id}@{manifest.revision})")
    print(f"files:     {len(manifest.files)}, {total:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
