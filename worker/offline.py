"""Offline mode for a serving worker: once it runs, the hub is never asked anything."""

from __future__ import annotations

import os
import sys

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def enter_offline_mode() -> None:
    """Forbid every hub request from this process from now on.

    The variables cover modules imported later; huggingface_hub copies HF_HUB_OFFLINE into
    `huggingface_hub.constants` at import (read at request time by it and by transformers), so
    an already imported hub is switched too.
    """
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
