"""The product end to end: a real redis-server, a real `chatqueue-worker run` process, and jobs
submitted and collected through `producer.ChatQueueClient`, as a backend would."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from chatqueue_dev.servers import redis_server, spawn_worker, wait_ready, worker_env
from producer import ChatQueueClient, ChatRequest, ChatResult, ProducerSettings
from producer.settings import stream_key

WORKER_START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerConfig:
    """The CHATQUEUE_* settings the benchmark's worker runs with; recorded in the results."""

    device: str
    dtype: str
    concurrency: int
    max_batch_size: int
    max_new_tokens_cap: int
    torch_threads: int  # as the baseline's process uses
    # CHATQUEUE_PREFIX_CACHING; None leaves the worker's default. (A worker that does not know
    # the setting ignores it.)
    prefix_caching: bool | None = None

    def env_settings(self) -> dict[str, str]:
        return {key: _env_value(value) for key, value in vars(self).items() if value is not None}


def _env_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class JobRun:
    prompt_index: int
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # submit -> result in hand, measured by the client
    queue_wait_s: float  # the worker's timings: submit -> a task slot starts the job
    batch_wait_s: float  # the worker's timings: part of generation_s spent waiting for a row
    first_token_s: float  # the worker's timings: task slot start -> the first token
    generation_s: float  # the worker's timings: task slot start -> result built
    finished_at: float  # the worker's timings, epoch seconds: when the engine gave the result
    # Prompt tokens the worker took from its prefix cache instead of computing (0 from a
    # worker without one, or with it off).
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class LevelRun:
    """N jobs submitted together."""

    jobs: list[JobRun]
    wall_s: float  # first submit -> last result
    # Each streamed text event: seconds from its oldest token's pick (the worker's `t`) to this
    # process reading it (one reader streaming every job of the level).
    stream_lags_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(job.completion_tokens for job in self.jobs) / self.wall_s


@contextmanager
def running_product(
    model_dir: Path, config: WorkerConfig, log_dir: Path, result_timeout_s: float
) -> Iterator[ChatQueueClient]:
    """Start redis-server and one worker on the model; yield a client wired to them."""
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    with redis_server() as redis:
        env = worker_env(redis.url, model_dir, queue, **config.env_settings())
        worker = spawn_worker(env, log_dir)
        try:
            wait_ready(worker, timeout=WORKER_START_TIMEOUT_S)
            settings = ProducerSettings(
                broker_url=redis.url, queue=queue, wait_timeout_s=result_timeout_s
            )
            with ChatQueueClient(settings) as client:
                yield client
        finally:
            worker.stop()


# Qwen3's generation_config (thinking mode), set on every job of the sampled run; plus a seed
# per job, so a run is reproducible.
QWEN3_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def benchmark_request(
    messages: list[dict[str, str]], *, max_new_tokens: int, enable_thinking: bool,
    sampling: dict[str, Any] | None = None,
) -> ChatRequest:
    """Greedy unless `sampling` says otherwise, with EOS ignored: every job generates exactly
    max_new_tokens."""
    return ChatRequest.model_validate({
        "messages": messages,
        "params": {"max_new_tokens": max_new_tokens, "do_sample": False, "ignore_eos": True,
                   "enable_thinking": enable_thinking, **(sampling or {})},
    })


def run_level(
    client: ChatQueueClient, prompts: list[list[dict[str, str]]], *, max_new_tokens: int,
    enable_thinking: bool, sampled: bool = False, streamed: bool = False,
) -> LevelRun:
    """Submit one job per prompt back to back, then wait for them all. `sampled`: Qwen3's
    default sampling on every job, job i seeded with i. `streamed`: a client streams each job
    (`StreamWatcher`), and the level keeps how live the streams were.

    Each job gets a waiting thread as soon as it is submitted, so its latency is stamped when
    its own result arrives, not when a loop over the others gets round to it.
    """
    requests = [
        benchmark_request(m, max_new_tokens=max_new_tokens, enable_thinking=enable_thinking,
                          sampling={**QWEN3_SAMPLING, "seed": i} if sampled else None)
        for i, m in enumerate(prompts)
    ]
    watcher = StreamWatcher(client.settings.broker_url) if streamed else None
    with ThreadPoolExecutor(max_workers=len(requests)) as waiters:
        pending = []
        for index, request in enumerate(requests):
            submitted = time.perf_counter()
            job_id = client.submit(request)
            if watcher is not None:
                watcher.watch(job_id)
            pending.append((index, submitted, waiters.submit(_await_result, client, job_id)))
        jobs, finished = [], []
        for index, submitted, future in pending:
            result, done = future.result()
            _check_complete(result.usage.completion_tokens, result.finish_reason, max_new_tokens)
            finished.append(done)
            jobs.append(JobRun(
                prompt_index=index, prompt_tokens=result.usage.prompt_tokens,
                completion_tokens=result.usage.completion_tokens, latency_s=done - submitted,
                queue_wait_s=result.timings.queue_wait_s or 0.0,
                batch_wait_s=result.timings.batch_wait_s or 0.0,
                first_token_s=result.timings.first_token_s or 0.0,
                generation_s=result.timings.generation_s,
                finished_at=result.timings.finished_at.timestamp(),
                cached_prompt_tokens=getattr(result.usage, "cached_prompt_tokens", None) or 0,
            ))
    lags = watcher.close() if watcher is not None else []
    return LevelRun(jobs=jobs, wall_s=max(finished) - pending[0][1], stream_lags_s=lags)


class StreamWatcher:
    """One thread reading every watched job's stream (one XREAD BLOCK over all of them, as a
    client per job would, without a thread per job competing for the benchmark's cores); for
    each text event, how long after its oldest token was picked (the worker's `t` field, epoch
    seconds on this machine's clock) it was read here."""

    def __init__(self, redis_url: str) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.lags_s: list[float] = []
        self._cursors: dict[str, bytes | str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="stream-watcher", daemon=True)
        self._thread.start()

    def watch(self, job_id: str) -> None:
        with self._lock:
            self._cursors[stream_key(job_id)] = "0-0"

    def close(self, timeout_s: float = 30.0) -> list[float]:
        """Once every watched stream ended (or `timeout_s`): the lags seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._cursors:
                    break
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(5)
        self.redis.close()
        return self.lags_s

    def _read(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                cursors = dict(self._cursors)
            if not cursors:
                time.sleep(0.005)
                continue
            reply = self.redis.xread(cursors, block=100)  # type: ignore[arg-type]
            now = time.time()
            for key, entries in reply or []:
                name = key.decode() if isinstance(key, bytes) else key
                for entry_id, fields in entries:
                    picked = fields.get(b"t")
                    if picked is not None:
                        self.lags_s.append(now - float(picked))
                    with self._lock:
                        if fields.get(b"type") == b"end":
                            self._cursors.pop(name, None)
                        elif name in self._cursors:
                            self._cursors[name] = entry_id


def warm_up(client: ChatQueueClient, messages: list[dict[str, str]], enable_thinking: bool) -> None:
    """One short job first: the client's broker and result connections open here, not in the
    first timed job (the baseline gets the same courtesy)."""
    client.result(client.submit(benchmark_request(messages, max_new_tokens=2,
                                                  enable_thinking=enable_thinking)))


def _await_result(client: ChatQueueClient, job_id: str) -> tuple[ChatResult, float]:
    result = client.result(job_id)
    return result, time.perf_counter()


def _check_complete(completion_tokens: int, finish_reason: str, max_new_tokens: int) -> None:
    if completion_tokens != max_new_tokens or finish_reason != "length":
        raise RuntimeError(
            f"a job ended with {completion_tokens} tokens ({finish_reason}), expected "
            f"{max_new_tokens} (length): ignore_eos did not hold, the runs are not comparable"
        )
