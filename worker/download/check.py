"""The worker-start check: offline from here on, and the model folder verified and as pinned."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys

from worker.download.pins import describe, pin_mismatches
from worker.manifest import MANIFEST_NAME, Manifest, ModelNotReady, verify_model_dir
from worker.offline import OFFLINE_VARIABLES, enter_offline_mode
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def fetch_command(settings: WorkerSettings) -> str:
    """The command an operator runs to fetch the model these settings name."""
    return shlex.join(["chatqueue-worker", "download", *download_args(settings)])


def download_args(settings: WorkerSettings) -> list[str]:
    args = [
        "--model-id",
        settings.model_id,
        "--revision",
        settings.model_revision,
        "--endpoint",
        settings.hf_endpoint,
        "--model-dir",
        str(settings.resolved_model_dir),
    ]
    if settings.hf_home is not None:
        args += ["--hf-home", str(settings.hf_home)]
    if settings.model_sha256 is not None:
        args += ["--sha256", settings.model_sha256]
    return args


def ensure_model(settings: WorkerSettings) -> Manifest:
    """The worker-start check: offline from here on, and the model folder verified and pinned.

    With download_if_missing, a folder without a manifest (absent, or left by an interrupted
    download) is fetched first -- in a child process. That child is the only network access a
    worker makes: this process turns offline before it starts and never goes online again.
    Raises ModelNotReady (the worker exits before taking a job) naming what is wrong.
    """
    enter_offline_mode()
    model_dir = settings.resolved_model_dir
    hint = f"Fetch it with: {fetch_command(settings)}"
    if settings.download_if_missing and not (model_dir / MANIFEST_NAME).is_file():
        _download_in_child(settings, hint)
    manifest = verify_model_dir(model_dir, fetch_hint=hint, check_hashes=settings.verify_hashes)
    # With verify_hashes off the digest vouches for the manifest's hashes only; the sizes and
    # the list of files are still checked against the folder.
    if problems := pin_mismatches(manifest, pinned_commit=settings.pinned_commit,
                                  expected_sha256=settings.model_sha256):
        raise ModelNotReady(f"{describe(model_dir, problems)}. {hint}")
    return manifest


def _download_in_child(settings: WorkerSettings, hint: str) -> None:
    # A child rather than flipping offline mode off and on here: the hub reads its environment
    # once at import and transformers may already be imported; a child starts with a clean,
    # online hub and takes its network state with it when it exits.
    argv = [sys.executable, "-m", "worker.download", *download_args(settings)]
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    # The token travels in the environment, never in argv (visible to every local user in ps).
    env.pop("HF_TOKEN", None)
    env.pop("CHATQUEUE_HF_TOKEN", None)
    if settings.hf_token is not None:
        env["CHATQUEUE_HF_TOKEN"] = settings.hf_token.get_secret_value()
    log.info(
        "model folder %s is not complete; downloading %s@%s from %s",
        settings.resolved_model_dir,
        settings.model_id,
        settings.model_revision,
        settings.hf_endpoint,
    )
    status = subprocess.run(argv, env=env, check=False).returncode
    if status != 0:
        raise ModelNotReady(
            f"downloading {settings.model_id}@{settings.model_revision} from "
            f"{settings.hf_endpoint} failed (exit status {status}; its message is above). {hint}"
        )
