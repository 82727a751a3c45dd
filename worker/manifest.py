"""The model folder's manifest: what was fetched, from where, at which commit, with which hashes.

Every model a worker serves -- downloaded through a mirror or built locally (the demo and the
tiny test model) -- carries one. The worker verifies the folder against it at start and names
`repo_id` and `commit` in every result, so an operator always knows which revision answered.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from worker.errors import ModelNotReady

MANIFEST_NAME = "chatqueue-manifest.json"
# huggingface_hub keeps its partial downloads and metadata under <local_dir>/.cache.
_IGNORED_DIRS = {".cache", ".git"}
_CHUNK = 1 << 20


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int
    sha256: str
    # What the mirror reported, kept for audit: LFS files carry their sha256, others a git blob id.
    lfs: bool = False
    blob_id: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str
    revision: str
    commit: str
    endpoint: str
    created_at: datetime
    files: list[ManifestFile]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_id(path: Path) -> str:
    """The id git (and so the Hub) gives a non-LFS file: sha1 over a header and the bytes."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_model_files(model_dir: Path) -> list[str]:
    """Relative paths of the files a manifest covers, sorted; skips hub metadata and the
    manifest."""
    found = []
    for path in model_dir.rglob("*"):
        rel = path.relative_to(model_dir)
        if not path.is_file() or rel.parts[0] in _IGNORED_DIRS or rel.as_posix() == MANIFEST_NAME:
            continue
        found.append(rel.as_posix())
    return sorted(found)


def manifest_for_local_dir(
    model_dir: Path, *, repo_id: str, revision: str, endpoint: str
) -> Manifest:
    """A manifest for a folder built on this machine; its commit is a digest of the contents."""
    files = [
        ManifestFile(path=rel, size=(model_dir / rel).stat().st_size,
                     sha256=sha256_file(model_dir / rel))
        for rel in list_model_files(model_dir)
    ]
    content_digest = hashlib.sha256("".join(f"{f.path}:{f.sha256}\n" for f in files).encode())
    return Manifest(
        repo_id=repo_id,
        revision=revision,
        commit=content_digest.hexdigest()[:40],
        endpoint=endpoint,
        created_at=datetime.now(UTC),
        files=files,
    )


def manifest_digest(manifest: Manifest) -> str:
    """The sha256 that pins a model folder's content: of its files' `sha256sum` listing.

    Every listed file's sha256 and path, sorted by path, one `<sha256>  <path>` line each -- what
    `sha256sum` prints -- so an operator can compute it without chatqueue:
    `cd <model dir> && sha256sum <files> | LC_ALL=C sort -k2 | sha256sum`. Where the files came
    from, when, and the manifest's own layout do not change it; any byte of any file does.
    """
    listing = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(manifest.files, key=_path_key))
    return hashlib.sha256(listing.encode()).hexdigest()


def _path_key(entry: ManifestFile) -> bytes:
    return entry.path.encode()  # byte order, as `LC_ALL=C sort`


def unlisted_files(model_dir: Path, manifest: Manifest) -> list[str]:
    """Files in the folder that the manifest does not list (hub metadata and the manifest aside)."""
    listed = {entry.path for entry in manifest.files}
    return [path for path in list_model_files(model_dir) if path not in listed]


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Write atomically: a reader sees the old manifest or the new one, never half of one."""
    target = model_dir / MANIFEST_NAME
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, target)
    return target


def read_manifest(model_dir: Path, *, fetch_hint: str = "") -> Manifest:
    target = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        raise ModelNotReady(f"model folder {model_dir} does not exist. {fetch_hint}".strip())
    if not target.is_file():
        raise ModelNotReady(
            f"model folder {model_dir} has no {MANIFEST_NAME}: the download did not finish "
            f"or the folder was not made by chatqueue. {fetch_hint}".strip()
        )
    try:
        return Manifest.model_validate(json.loads(target.read_text()))
    except (ValueError, OSError) as exc:
        raise ModelNotReady(f"{target} is unreadable ({exc}). {fetch_hint}".strip()) from exc


def verify_model_dir(
    model_dir: Path, *, fetch_hint: str = "", check_hashes: bool = True
) -> Manifest:
    """Check every file the manifest lists: present, right size and (by default) right sha256;
    and that the folder holds no file the manifest does not list.

    An unlisted file is refused, not ignored: transformers picks files up by name (a pickled
    `pytorch_model.bin`, a `chat_template.jinja`, a tokenizer file, code for trust_remote_code),
    so a file dropped into the folder could change what is loaded without changing the digest.
    Raises ModelNotReady naming every problem found, so one message tells the operator everything.
    """
    manifest = read_manifest(model_dir, fetch_hint=fetch_hint)
    problems = [
        f"{path}: not listed in {MANIFEST_NAME} (remove it)"
        for path in unlisted_files(model_dir, manifest)
    ]
    for entry in manifest.files:
        path = model_dir / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"{entry.path}: size {size} bytes, expected {entry.size}")
        elif check_hashes and (actual := sha256_file(path)) != entry.sha256:
            problems.append(
                f"{entry.path}: sha256 {actual[:12]}..., expected {entry.sha256[:12]}...")
    if problems:
        listing = "; ".join(problems)
        raise ModelNotReady(
            f"model folder {model_dir} ({manifest.repo_id}@{manifest.commit[:12]}) fails "
            f"verification: {listing}. {fetch_hint}".strip()
        )
    return manifest
