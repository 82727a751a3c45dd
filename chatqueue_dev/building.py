"""Building a model folder: stage it beside its place, swap it in whole, never touch a folder
chatqueue did not make; and the files that installed packages ship (tokenizer ranks, gguf)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.errors import ModelNotReady
from worker.manifest import (
    MANIFEST_NAME,
    Manifest,
    manifest_for_local_dir,
    verify_model_dir,
    write_manifest,
)

logger = logging.getLogger(__name__)

BUILD_ENDPOINT = "local:chatqueue.devmodels"


def build_folder(
    out_dir: Path, *, force: bool, repo_id: str, revision: str, make: Callable[[Path], None]
) -> Manifest:
    if not force and (existing := _valid_existing(out_dir, repo_id, revision)) is not None:
        logger.info("%s already holds %s@%s; keeping it", out_dir, repo_id, existing.commit[:12])
        return existing
    _refuse_foreign_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    staging = _sibling(out_dir, "building")
    staging.mkdir()
    try:
        make(staging)
        _give_files_the_usual_mode(staging)
        manifest = manifest_for_local_dir(
            staging, repo_id=repo_id, revision=revision, endpoint=BUILD_ENDPOINT
        )
        write_manifest(staging, manifest)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "built %s@%s in %s (%.1f s)",
        repo_id,
        manifest.commit[:12],
        out_dir,
        time.monotonic() - started,
    )
    return manifest


def _valid_existing(out_dir: Path, repo_id: str, revision: str) -> Manifest | None:
    try:
        manifest = verify_model_dir(out_dir)
    except ModelNotReady as exc:
        if out_dir.exists():
            logger.info("rebuilding: %s", exc)
        return None
    if (manifest.repo_id, manifest.revision) != (repo_id, revision):
        logger.info("rebuilding: %s holds %s@%s", out_dir, manifest.repo_id, manifest.revision)
        return None
    return manifest


def _refuse_foreign_folder(out_dir: Path) -> None:
    """A rebuild replaces out_dir whole: never do that to a folder chatqueue did not make."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} exists, is not empty and has no {MANIFEST_NAME}: it was not built by "
            "chatqueue, so it is left alone. Choose another --out or remove it."
        )


def _move_into_place(staging: Path, out_dir: Path) -> None:
    # A directory cannot be renamed over a non-empty one: move the old folder aside first.
    # Readers see the old folder, then none for an instant, then the new one -- never a half one.
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = _sibling(out_dir, "old")
    out_dir.rename(retired)
    try:
        staging.rename(out_dir)
    except BaseException:
        retired.rename(out_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _give_files_the_usual_mode(folder: Path) -> None:
    """safetensors writes its files 0600; give every file the mode open() gives (the umask's), so
    a worker running as another user -- a container's, say -- can read the folder."""
    mode = folder.stat().st_mode & 0o666  # the folder was made by mkdir, which honours the umask
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def _sibling(out_dir: Path, tag: str) -> Path:
    # Same parent, so renames stay on one filesystem; hidden and unique, so builds don't collide.
    return out_dir.with_name(f".{out_dir.name}.{tag}-{uuid.uuid4().hex[:8]}")


def package_dir(package: str, *, install: str) -> Path:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token")
    return int(token_id)
