"""Session-wide fixtures: the tiny test model, built once and cached across sessions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.servers import tiny_model_dir as cached_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return cached_tiny_model_dir()
