"""Session-wide fixtures: the tiny test model, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.devmodels import build_tiny_qwen

    folder = tmp_path_factory.mktemp("models") / "tiny-qwen3"
    build_tiny_qwen(folder)
    return folder
