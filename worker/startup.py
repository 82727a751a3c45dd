"""Worker start: check the model folder, load once onto the device, start the engine, warm up."""

from __future__ import annotations

import logging

from worker.manifest import verify_model_dir
from worker.model import load_model, resolve_device
from worker.service import WorkerRuntime
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def start_runtime(settings: WorkerSettings) -> WorkerRuntime:
    model_dir = settings.resolved_model_dir
    manifest = verify_model_dir(model_dir, check_hashes=settings.verify_hashes)
    device = resolve_device(settings.device)
    loaded = load_model(model_dir, manifest, device=device, dtype=settings.dtype,
                        trust_remote_code=settings.trust_remote_code)
    runtime = WorkerRuntime.start(settings, loaded)
    if settings.warmup:
        runtime.warm_up()
    log.info("worker ready: %s@%s on %s, queue %r, %d task slots", manifest.repo_id,
             manifest.commit[:12], device, settings.queue, settings.concurrency)
    return runtime
