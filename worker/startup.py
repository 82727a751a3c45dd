"""Worker start: check the model folder, load once onto the device, start the engine, warm up."""

from __future__ import annotations

import logging

import torch

from worker.control import JobControl
from worker.download import ensure_model
from worker.manifest import ModelNotReady
from worker.metrics import WorkerMetrics
from worker.model import load_model, resolve_device
from worker.service import WorkerRuntime
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def start_runtime(settings: WorkerSettings, worker_name: str | None = None) -> WorkerRuntime:
    metrics = WorkerMetrics(settings.model_id)
    if settings.metrics_port is not None:
        # Up before the model loads, so a scrape during a long load shows model_loaded 0.
        port = metrics.serve(settings.metrics_port, settings.metrics_addr)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_addr, port)
    model_dir = settings.resolved_model_dir
    manifest = ensure_model(settings)
    if manifest.repo_id != settings.model_id:
        # The queue is named after model_id: serving another model from it would mislabel jobs.
        raise ModelNotReady(
            f"model folder {model_dir} holds {manifest.repo_id}, but this worker is configured "
            f"for {settings.model_id} (CHATQUEUE_MODEL_ID)"
        )
    device = resolve_device(settings.device)
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    loaded = load_model(model_dir, manifest, device=device, dtype=settings.dtype,
                        trust_remote_code=settings.trust_remote_code)
    control = JobControl.connect(settings, ttl_s=settings.result_ttl_s,
                                 stream_maxlen=settings.stream_maxlen)
    runtime = WorkerRuntime.start(settings, loaded, metrics, control, worker_name)
    if settings.warmup:
        runtime.warm_up()
    metrics.model_loaded(loaded.load_s, revision=manifest.commit, device=str(device))
    log.info("worker ready: %s@%s on %s, queue %r, %d task slots", manifest.repo_id,
             manifest.commit[:12], device, settings.serving_queue, settings.concurrency)
    return runtime
