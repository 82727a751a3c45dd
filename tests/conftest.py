"""Session-wide fixtures: the tiny test model, built once and cached by its builder's source."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from worker import devmodels

    # Keyed by the builder's source: a changed recipe builds a new model, an unchanged one is
    # reused across sessions (the builder verifies the folder against its manifest first).
    recipe = hashlib.sha256(Path(devmodels.__file__).read_bytes()).hexdigest()[:12]
    folder = REPO_ROOT / ".cache" / "models" / f"tiny-qwen3-{recipe}"
    devmodels.build_tiny_qwen(folder)
    return folder
