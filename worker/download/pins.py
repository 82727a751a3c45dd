"""Pins: the commit and the manifest digest an operator expects, checked at download and start.

The mirror's hashes come from the mirror that served the files: they catch corruption, not
substitution. A pin comes from somewhere else (a review, a release note, another machine), so a
mirror that serves other bytes -- or a branch that moved -- is refused instead of loaded.
"""

from __future__ import annotations

from pathlib import Path

from worker.manifest import Manifest, manifest_digest

COMMIT_SETTING = "CHATQUEUE_MODEL_REVISION"
DIGEST_SETTING = "CHATQUEUE_MODEL_SHA256"


def pin_mismatches(
    manifest: Manifest, *, pinned_commit: str | None, expected_sha256: str | None
) -> list[str]:
    """What differs from the pins, each naming the setting, the expected and the found value."""
    problems = []
    if pinned_commit is not None and manifest.commit != pinned_commit:
        problems.append(
            f"{COMMIT_SETTING} pins commit {pinned_commit}, but the folder holds commit "
            f"{manifest.commit} ({manifest.repo_id}@{manifest.revision})"
        )
    if expected_sha256 is not None and (found := manifest_digest(manifest)) != expected_sha256:
        problems.append(
            f"{DIGEST_SETTING} expects manifest digest {expected_sha256}, but the folder's is "
            f"{found}"
        )
    return problems


def describe(model_dir: Path, problems: list[str]) -> str:
    return f"model folder {model_dir} is not the pinned model: " + "; ".join(problems)
