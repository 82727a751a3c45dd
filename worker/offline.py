"""Offline mode for a serving worker: the hub is never asked anything once a worker runs."""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def enter_offline_mode() -> None:
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
