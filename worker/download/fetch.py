"""Fetch a model through a Hub mirror, verify every file, write the folder's manifest.

`download_model` is the only code in chatqueue that talks to a Hub. The manifest is written
last, so its presence means the folder is complete, verified and -- when pinned -- the pinned one.
"""

from __future__ import annotations

import fcntl
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils import tqdm as hf_tqdm
from pydantic import SecretStr

from worker.download.failures import (
    REQUEST_TIMEOUT_S,
    DownloadError,
    explain,
    refuse_token_in_clear,
    with_retries,
)
from worker.download.pins import pin_mismatches
from worker.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    git_blob_id,
    list_model_files,
    manifest_digest,
    sha256_file,
    write_manifest,
)
from worker.settings import is_commit_id

log = logging.getLogger(__name__)

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

# Kept apart from the hub's own .cache/huggingface so that the two never collide.
_LOCK_NAME = "chatqueue-download.lock"

T = TypeVar("T")


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
    expected_sha256: str | None = None,
) -> Manifest:
    """Download `repo_id` at `revision` into `local_dir`, verify every file, write the manifest.

    A `revision` that is a full commit id must resolve to itself; with `expected_sha256` the
    files must give that manifest digest, or no manifest is written. Files already complete in
    `local_dir` are not fetched again, so an interrupted run is resumed by running it again.
    Raises DownloadError when the download cannot succeed as asked.
    """
    refuse_token_in_clear(endpoint, token)
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
        expected_sha256=expected_sha256,
    )
    request.local_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive_download_lock(request.local_dir):
            return _download_locked(request)
    except (httpx2.HTTPError, OfflineModeIsEnabled, EntryNotFoundError) as exc:
        raise explain(exc, api=request.api, repo_id=repo_id, revision=revision,
                      where=request.where) from exc


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
    expected_sha256: str | None

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision} from {self.endpoint}"

    def retried(self, action: Callable[[], T]) -> T:
        return with_retries(action, self.where, self.max_attempts)


def _download_locked(request: _Request) -> Manifest:
    api, repo_id, local_dir = request.api, request.repo_id, request.local_dir
    commit = request.retried(lambda: _resolve_commit(api, repo_id, request.revision))
    if is_commit_id(request.revision) and commit != request.revision:
        raise DownloadError(
            f"cannot download {request.where}: the mirror resolves pinned commit "
            f"{request.revision} to {commit}; refusing what it serves"
        )
    listing = request.retried(lambda: _list_files(api, repo_id, commit))
    wanted = _select(listing, request.patterns)
    if not wanted:
        raise DownloadError(f"cannot download {request.where}: no file matches {request.patterns}")
    # From here on the folder changes: it must not claim to be complete until verified again.
    (local_dir / MANIFEST_NAME).unlink(missing_ok=True)
    _remove_stale_partials(local_dir)
    _clear_unlisted(local_dir, wanted, request.where)
    files = _fetch_and_verify(lambda: request.retried(lambda: _snapshot(request, commit)),
                              local_dir, wanted, request.where)
    manifest = Manifest(repo_id=repo_id, revision=request.revision, commit=commit,
                        endpoint=request.endpoint, created_at=datetime.now(UTC), files=files)
    # The commit was checked above; the digest now, before the manifest vouches for the folder.
    if problems := pin_mismatches(manifest, pinned_commit=None,
                                  expected_sha256=request.expected_sha256):
        raise DownloadError(
            f"downloaded {request.where} into {local_dir}, but it is not the pinned model: "
            f"{problems[0]} (or --sha256); no manifest written"
        )
    write_manifest(local_dir, manifest)
    log.info("%s (commit %s, manifest digest %s) is complete in %s", request.where, commit,
             manifest_digest(manifest), local_dir)
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
    info = api.model_info(repo_id, revision=revision, timeout=REQUEST_TIMEOUT_S)
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
        etag_timeout=REQUEST_TIMEOUT_S,
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


def _clear_unlisted(local_dir: Path, wanted: list[RemoteFile], where: str) -> None:
    """Before fetching: the folder must end up holding only what the manifest will list.

    A file an earlier download into this folder fetched (another revision, --all-files) has the
    hub's metadata beside it and is removed. Any other file is refused, not deleted: it may be
    an operator's, and a worker would refuse the folder with it.
    """
    keep = {remote.path for remote in wanted}
    fetched_before: list[str] = []
    foreign: list[str] = []
    for path in list_model_files(local_dir):
        if path not in keep:
            (fetched_before if _hub_metadata(local_dir, path).is_file() else foreign).append(path)
    if foreign:
        raise DownloadError(
            f"cannot download {where} into {local_dir}: it holds files that this download "
            f"did not fetch and will not list: {', '.join(foreign)}. Remove them or choose "
            "another --model-dir (a worker refuses a model folder with unlisted files)"
        )
    for path in fetched_before:
        log.info("removing %s: fetched by an earlier download, not part of this one", path)
        (local_dir / path).unlink()
        _hub_metadata(local_dir, path).unlink(missing_ok=True)


def _hub_metadata(local_dir: Path, path: str) -> Path:
    # Where huggingface_hub records a file it downloaded into local_dir (commit, etag, time).
    return local_dir / ".cache" / "huggingface" / "download" / f"{path}.metadata"
