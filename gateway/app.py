"""The ASGI app: OpenAI's chat completions and models endpoints over AsyncChatQueueClient,
with API keys, a body size limit, load shedding, health and Prometheus metrics. A stream's
server-sent events are gateway/streaming.py's; the Files and Batch endpoints are
gateway/batches.py's."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import glob
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis
from kombu.exceptions import OperationalError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from gateway.admission import Admission
from gateway.batches import Batches
from gateway.openai_api import (
    completion,
    error_body,
    job_error_body,
    job_error_status,
    line_error_body,
    to_job,
)
from gateway.settings import GatewaySettings, key_matches
from gateway.streaming import (
    JobStream,
    ResultWatch,
    StreamHub,
    cancel_quietly,
    disconnected,
)
from producer.aio import AsyncChatQueueClient
from producer.batches import LineError
from producer.batches.metrics import BatchCollector
from producer.errors import ChatQueueError, JobFailed
from producer.settings import ProducerSettings

log = logging.getLogger(__name__)

_ROUTES = ("/v1/chat/completions", "/v1/models", "/healthz", "/metrics", "/v1/files",
           "/v1/batches")


class ApiError(ChatQueueError):
    """An HTTP error answered as OpenAI's error object (no job's end: outcome None)."""

    def __init__(self, status: int, message: str, *, type_: str, code: str | None = None,
                 param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_=type_, code=code, param=param, **extra)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


class Metrics:
    """The gateway's metrics. With `multiprocess_dir` (several gateway processes: gateway/cli.py
    sets PROMETHEUS_MULTIPROC_DIR for them, so prometheus_client keeps every value in a file
    there), what /metrics exposes is every process's, added up (`exposed`)."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        if multiprocess_dir is not None and values.ValueClass is values.MutexValue:
            # prometheus_client chose where values live when it was imported: in memory.
            raise ValueError(f"metrics in {multiprocess_dir}: PROMETHEUS_MULTIPROC_DIR must "
                             "name it before prometheus_client is imported")
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self.requests = Counter("chatqueue_gateway_requests_total", "HTTP requests answered",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("chatqueue_gateway_request_seconds",
                                 "Request start -> response end (a stream: its last byte)",
                                 ["route"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30,
                                          60, 120, 300))
        # Summed over the processes alive (a process that ends drops its own: release()).
        self.in_flight = Gauge("chatqueue_gateway_in_flight", "Requests being answered",
                               ["route"], registry=self.registry, multiprocess_mode="livesum")
        self.first_token = Histogram("chatqueue_gateway_first_token_seconds",
                                     "Request start -> first generated text sent (streams)",
                                     registry=self.registry,
                                     buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.cancelled = Counter("chatqueue_gateway_disconnect_cancels_total",
                                 "Jobs cancelled because their client went away",
                                 registry=self.registry)
        self.exposed = self.registry
        if multiprocess_dir is not None:
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, path=multiprocess_dir)  # type: ignore[no-untyped-call]

    def forget_dead_processes(self) -> None:
        """Drop the live gauges of processes that ended without release() (killed: SIGKILL,
        the OOM killer), which would otherwise count their requests in flight forever.
        Called at each scrape; a process id is dead when no process has it."""
        if self.multiprocess_dir is None:
            return
        for path in glob.glob(os.path.join(self.multiprocess_dir, "gauge_live*_*.db")):
            pid = path.rpartition("_")[2].removesuffix(".db")
            if pid.isdigit() and not _alive(int(pid)):
                mark_process_dead(int(pid), self.multiprocess_dir)  # type: ignore[no-untyped-call]

    def release(self) -> None:
        """This process stops serving: its live gauges no longer count (its counters and
        histograms keep what it served)."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Gateway:
    def __init__(self, settings: GatewaySettings, producer: ProducerSettings,
                 key_digests: tuple[bytes, ...], metrics_dir: str | None = None) -> None:
        self.settings, self.producer_settings = settings, producer
        self.digests = key_digests
        self.metrics = Metrics(metrics_dir)
        self._client: AsyncChatQueueClient | None = None
        self._watch: ResultWatch | None = None
        self._hub: StreamHub | None = None
        self._admission: Admission | None = None

    @property
    def client(self) -> AsyncChatQueueClient:
        assert self._client is not None, "the gateway is not started"
        return self._client

    @property
    def admission(self) -> Admission:
        assert self._admission is not None, "the gateway is not started"
        return self._admission

    @property
    def stream_hub(self) -> StreamHub:
        assert self._hub is not None, "the gateway is not started"
        return self._hub

    @property
    def result_watch(self) -> ResultWatch:
        assert self._watch is not None, "the gateway is not started"
        return self._watch

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        self._client = AsyncChatQueueClient(self.producer_settings)
        self._watch = ResultWatch(self._client)
        self._hub = StreamHub(self._client)
        self._admission = Admission(self._client.redis, self.settings.models_cache_s,
                                    self.settings.queue_length_cache_s)
        keeper = asyncio.create_task(self._admission.keep_fresh())
        # What is alive now (the imported Celery, kombu, pydantic, Starlette: ~60k objects)
        # lives as long as the process: kept out of the collector's full passes, which took
        # ~40 ms each on this machine -- a pause that landed inside a burst of requests.
        gc.collect()
        gc.freeze()
        # Batch progress, read from Redis at each scrape (a scrape runs in a thread).
        collector = BatchCollector(self._client.blocking.redis)
        self.metrics.exposed.register(collector)
        try:
            yield
        finally:
            self.metrics.exposed.unregister(collector)
            self.metrics.release()
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await self._watch.aclose()
            await self._hub.aclose()
            await self._client.aclose()

    # -- checks ------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if not self.digests:
            return  # no key configured: the CLI binds loopback only
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token or not key_matches(token.strip(),
                                                                     self.digests):
            raise ApiError(401, "Incorrect or missing API key (Authorization: Bearer <key>)",
                           type_="invalid_request_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit, int(declared))
        body = bytearray()
        async for part in request.stream():  # chunked bodies are counted as they come
            body += part
            if len(body) > limit:
                raise _too_large(limit, len(body))
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}",
                           type_="invalid_request_error", code="invalid_json") from None

    # -- endpoints ---------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        try:
            await self.client.redis.ping()
        except redis.RedisError:
            return JSONResponse({"status": "redis unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        self.authorize(request)
        self.metrics.forget_dead_processes()
        body = await asyncio.to_thread(generate_latest, self.metrics.exposed)  # reads Redis
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        live = await self.admission.live_models()
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "chatqueue"}
            for model in sorted(live)]})

    async def chat_completions(self, request: Request) -> Response | JobStream:
        started = time.perf_counter()
        self.authorize(request)
        body = await self.read_json(request)
        try:
            options, job = to_job(body)
        except LineError as refused:
            return JSONResponse(line_error_body(refused), status_code=refused.status_code)
        model = job.model or self.producer_settings.default_model
        queue = self.client.queue_for(job)
        # Both read for all requests at once (gateway/admission.py): a request in a burst
        # reaches its submit without waiting on Redis.
        if queue not in (await self.admission.live_models()).get(model, set()):
            raise ApiError(503, f"no live worker serves model {model!r}",
                           type_="service_unavailable", code="model_not_available",
                           param="model")
        waiting = await self.admission.queue_length(queue)
        if waiting > self.settings.max_queue_length:
            raise ApiError(429, f"model {model!r} has {waiting} jobs waiting, over this "
                           f"gateway's bound of {self.settings.max_queue_length}: retry later",
                           type_="rate_limit_error", code="queue_full",
                           limit=self.settings.max_queue_length, value=waiting)
        self.admission.queued(queue)  # counted now: the requests of a burst see each other
        job_id = await self.client.submit(job)
        if options.stream:
            return JobStream(self, job_id, model, options.include_usage, started)
        return await self._complete(request, job_id)

    async def serve_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/chat/completions as an ASGI app of its own, called by the entry (_Observe)
        without Starlette's middleware and routing: the route every request of a burst takes,
        whose per-request cost queues the rest. An ApiError is answered here as Starlette's
        handler answers it; anything else goes up to the entry's handler of the unexpected."""
        request = Request(scope, receive)
        try:
            response = await self.chat_completions(request)
        except ApiError as refused:
            response = refused.response()
        await response(scope, receive, send)

    async def _complete(self, request: Request, job_id: str) -> Response:
        result_task = asyncio.ensure_future(
            self.client.result(job_id, timeout=self.settings.request_timeout_s))
        gone = asyncio.ensure_future(disconnected(request.receive))
        try:
            await asyncio.wait({result_task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not result_task.done():
                await self.cancel_for_disconnect(job_id)
                return Response(status_code=499)  # nobody reads it
            try:
                result = result_task.result()
            except JobFailed as failed:
                return JSONResponse(job_error_body(failed.error),
                                    status_code=job_error_status(failed.error))
            except TimeoutError:
                await cancel_quietly(self.client, job_id)
                raise ApiError(504, f"job {job_id} did not finish within "
                               f"{self.settings.request_timeout_s} s; it was cancelled",
                               type_="timeout_error", code="timeout") from None
            return JSONResponse(completion(result),
                                headers={"x-chatqueue-job-id": job_id})
        finally:
            for task in (result_task, gone):
                task.cancel()

    async def cancel_for_disconnect(self, job_id: str) -> None:
        self.metrics.cancelled.inc()
        await cancel_quietly(self.client, job_id)


def _too_large(limit: int, size: int) -> ApiError:
    return ApiError(413, f"request body: {size} bytes exceeds this gateway's limit of {limit}",
                    type_="invalid_request_error", code="request_too_large", param=None,
                    limit=limit, value=size)


class _Observe:
    """The ASGI entry: request counts, latencies and in-flight requests per route; POST
    /v1/chat/completions goes straight to its handler (Gateway.serve_completions), everything
    else through Starlette (`app`). The metrics' children are looked up once per route."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 gateway: Gateway) -> None:
        self.app, self.gateway, self.metrics = app, gateway, gateway.metrics
        self._routes = {route: (self.metrics.in_flight.labels(route),
                                self.metrics.latency.labels(route))
                        for route in (*_ROUTES, "other")}
        self._counts: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        completions = path == "/v1/chat/completions"
        route = "/v1/chat/completions" if completions else next(
            (r for r in _ROUTES if path == r or path.startswith(f"{r}/")), "other")
        status = [0]  # 0: no response started

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        in_flight, latency = self._routes[route]
        in_flight.inc()
        try:
            if completions and scope["method"] == "POST":
                await self._serve_completions(scope, receive, observed, status)
            else:
                await self.app(scope, receive, observed)
        finally:
            in_flight.dec()
            latency.observe(time.perf_counter() - started)
            key = (route, status[0] or 500)
            count = self._counts.get(key)
            if count is None:
                count = self._counts[key] = self.metrics.requests.labels(route, str(key[1]))
            count.inc()

    async def _serve_completions(self, scope: Scope, receive: Receive, send: Send,
                                 status: list[int]) -> None:
        try:
            await self.gateway.serve_completions(scope, receive, send)
        except Exception as exc:
            # As Starlette's ServerErrorMiddleware does for the other routes: the handler's
            # answer if no response has started, and the error raised on for the server to log.
            if not status[0]:
                response = await unexpected(Request(scope, receive), exc)
                await response(scope, receive, send)
            raise


async def unexpected(request: Request, exc: Exception) -> Response:
    """The answer to an error no handler expected. Redis away past the clients' retries (kombu
    raises OperationalError for a publish): a retryable 503; anything else a 500 -- both in
    OpenAI's shape, with no traceback."""
    if isinstance(exc, redis.RedisError | OperationalError):
        log.warning("%s %s: the queue is unreachable: %s", request.method, request.url.path,
                    exc)
        return JSONResponse(error_body("the queue is unreachable; retry later",
                                       type_="service_unavailable",
                                       code="queue_unavailable"), status_code=503)
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(error_body("internal error", type_="server_error",
                                   code="internal_error"), status_code=500)


def create_app(settings: GatewaySettings, producer: ProducerSettings | None = None,
               key_digests: tuple[bytes, ...] | None = None, metrics_dir: str | None = None
               ) -> Any:
    """The gateway's ASGI app. `metrics_dir`: one of several gateway processes, whose metrics
    are kept there (prometheus_client's multiprocess mode; gateway/cli.py)."""
    gateway = Gateway(settings, producer or ProducerSettings(),
                      settings.key_digests() if key_digests is None else key_digests,
                      metrics_dir)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}",
                                       type_=type_, code=str(exc.status_code)),
                            status_code=exc.status_code)

    batches = Batches(gateway, settings.files_dir, settings.max_file_bytes)
    app = Starlette(
        routes=[
            # POST is served by the entry (_Observe) before Starlette: here for its 405s.
            Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
            Route("/v1/models", gateway.models, methods=["GET"]),
            Route("/healthz", gateway.healthz, methods=["GET"]),
            Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
            *batches.routes(),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error,
                            Exception: unexpected},
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return _Observe(app, gateway)
