"""Model supply: fetch through a Hub mirror (fetch), check the folder at worker start (check),
the `chatqueue-worker download` command (cli); pins (pins) and failures (failures) shared.

A worker never talks to a Hub: it calls `ensure_model`, which puts the process in offline mode
and verifies the folder against its manifest and the configured pins.
"""

from worker.download.check import ensure_model, fetch_command
from worker.download.cli import main
from worker.download.failures import DownloadError
from worker.download.fetch import DEFAULT_ALLOW_PATTERNS, download_model
from worker.offline import OFFLINE_VARIABLES

__all__ = [
    "DEFAULT_ALLOW_PATTERNS",
    "OFFLINE_VARIABLES",
    "DownloadError",
    "download_model",
    "ensure_model",
    "fetch_command",
    "main",
]
