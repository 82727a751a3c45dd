"""Worker start and stop: check the model folder, load once onto the device, start the engine,
its relay and the lease keeper, warm up; and stop them all again (WorkerRuntime)."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import torch

from producer.schemas import ChatRequest
from worker import openmp
from worker.control import JobControl
from worker.download import ensure_model
from worker.drain import Drain
from worker.engine import Engine, EngineLimits, EngineRequest
from worker.errors import ModelNotReady
from worker.lease import LeaseKeeper
from worker.metrics import WorkerMetrics
from worker.model import LoadedModel, load_model, resolve_device
from worker.pipeline.sampling import SamplingParams
from worker.relay import Relay
from worker.service import build_prompt_ids
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    """Everything a worker process holds once: settings, the loaded model and its engine."""

    settings: WorkerSettings
    loaded: LoadedModel
    engine: Engine
    host: str
    metrics: WorkerMetrics
    control: JobControl | None = None
    worker_name: str | None = None
    drain: Drain = field(default_factory=Drain)
    leases: LeaseKeeper | None = None
    relay: Relay | None = None  # every running job's stream events and progress

    @classmethod
    def start(cls, settings: WorkerSettings, loaded: LoadedModel, metrics: WorkerMetrics,
              control: JobControl | None = None, worker_name: str | None = None) -> WorkerRuntime:
        limits = EngineLimits(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            batch_wait_s=settings.batch_wait_ms / 1000,
            max_step_tokens=settings.max_step_tokens,
            block_size=settings.kv_block_size,
            prefix_caching=settings.prefix_caching,
            kv_cache_bytes=settings.kv_cache_bytes,
            kv_cache_memory_fraction=settings.kv_cache_memory_fraction,
            native_kernels=settings.native_kernels,
            fast_path=settings.fast_path,
            kernel_cache_dir=settings.kernel_cache_dir,
        )
        engine = Engine(loaded.model, pad_id=loaded.pad_id, limits=limits,
                        think=loaded.think).start()
        leases = None if control is None else LeaseKeeper(
            control.redis, ttl_s=settings.job_lease_ttl_s, renew_s=settings.job_lease_renew_s,
            owner=worker_name).start()
        relay = Relay(control, loaded.tokenizer, loaded.think).start()
        engine.on_step(relay.wake)
        return cls(settings=settings, loaded=loaded, engine=engine, host=socket.gethostname(),
                   metrics=metrics, control=control, worker_name=worker_name, leases=leases,
                   relay=relay)

    def warm_up(self) -> None:
        """One short generation, so the first real job does not pay for lazy initialisation."""
        prompt = build_prompt_ids(self.loaded, ChatRequest.model_validate(
            {"messages": [{"role": "user", "content": "Hello"}]}))
        self.engine.generate(EngineRequest(prompt, 2, SamplingParams(do_sample=False),
                                           self.loaded.stop_ids))

    def stop(self) -> None:
        self.drain.stopping.set()  # jobs the engine drops now go back to the queue
        self.drain.cancel_timer()
        self.engine.stop()
        if self.relay is not None:
            self.relay.stop()
        if self.leases is not None:
            self.leases.stop()
        if self.control is not None:
            self.control.stop()
        self.metrics.model_unloaded()
        self.metrics.close()


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
    # From here on torch runs on the engine's thread: this thread's OpenMP team would only make
    # libgomp throttle the engine's (worker/openmp.py).
    if openmp.release_thread_pool():
        log.info("OpenMP: the loading thread's team released; the engine thread's is the only one")
    metrics.model_loaded(loaded.load_s, revision=manifest.commit, device=str(device))
    log.info("worker ready: %s@%s on %s, queue %r, %d task slots", manifest.repo_id,
             manifest.commit[:12], device, settings.serving_queue, settings.concurrency)
    return runtime
