"""Time to first token through the gateway against the producer's own stream, on loopback.

Starts a real redis-server, one worker on the tiny test model (or --model-dir) and a real
`chatqueue-gateway` process. Each round starts 2 x N streaming jobs at once, side by side,
their starts interleaved, on the same worker and the same machine load:

- producer (N): AsyncChatQueueClient.submit + stream; time to first token = submit start ->
  the first thinking or content event;
- gateway (N): POST /v1/chat/completions with stream: true over HTTP (SSE read by a minimal
  asyncio client); time to first token = request start -> the first chunk carrying text. The
  HTTP connections are kept alive and opened before each round's start, as the producer's
  client keeps its Redis connections warm (--cold-connections: a new one per request, its
  set-up timed).

Each path's client runs in a process of its own, both started at the same instant.

On a machine whose CPUs the worker and others share, a round's time to first token swings by
seconds from one run to the next; run side by side, both paths see the same swings. But on a
saturated worker a job's time to first token is mostly its place in the queue: a path whose
N jobs land a few hundred milliseconds later waits behind the other's N jobs, seconds. So two
parts of each job's time are measured apart from its queueing (all on the host's one clock):

- lag: its first text event's write into Redis (the stream entry id: Redis's clock) -> the
  client reading it;
- path: its time to first token less the time from its submission (the producer's
  submitted_at, kept in the result as timings.queued_at) to that write -- the request's way
  in up to its submission plus the lag: what the path itself costs. The gateway's overhead is
  the difference of the two paths' p50, per round.

Prints and writes (--out) p50 / p95 of both, the differences and ratios, and how many
requests ended with their final chunk and [DONE] (none may be lost). Bounded: 2 x N
requests a round, --max-new-tokens each.

    .venv/bin/python -m benchmarks.gateway_load --n 32
    .venv/bin/python -m benchmarks.gateway_load --n 200 --rounds 3   # issue 16's load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from chatqueue_dev.models import TINY_MESSAGES, TINY_MODEL_ID
from chatqueue_dev.servers import (
    REPO_ROOT,
    free_port,
    redis_server,
    spawn_worker,
    tiny_model_dir,
    wait_listed,
    wait_ready,
    worker_env,
)
from producer import AsyncChatQueueClient, ProducerSettings
from producer.settings import stream_key

QUEUE = "gateway-load"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(ttfts: list[float], lags: list[float], paths: list[float]) -> dict[str, float]:
    if not ttfts:
        return {}
    out = {"p50_ms": 1000 * statistics.median(ttfts), "p95_ms": 1000 * percentile(ttfts, 0.95),
           "max_ms": 1000 * max(ttfts)}
    for name, values in (("lag", lags), ("path", paths)):
        if values:
            out |= {f"{name}_p50_ms": 1000 * statistics.median(values),
                    f"{name}_p95_ms": 1000 * percentile(values, 0.95)}
    return out


# One job's outcome: (time to first token, job id, wall-clock time its first text was read).
Outcome = tuple[float, str, float]


async def first_text_written(redis: Any, job_id: str) -> float | None:
    """When the job's first thinking or content event was written into Redis (its entry id's
    milliseconds, Redis's clock), in seconds since the epoch."""
    for entry_id, fields in await redis.xrange(stream_key(job_id)):
        kind = fields.get(b"type", b"")
        if kind in (b"thinking", b"content") and fields.get(b"text"):
            return int(entry_id.split(b"-")[0]) / 1000
    return None


async def tally(client: AsyncChatQueueClient, n: int, results: list[Any], start_at: float,
                cpu_s: float) -> dict[str, Any]:
    """A path's numbers. `path`: each job's time to first token less the time from its
    submission (the producer's submitted_at, which the result keeps as timings.queued_at) to
    its first text's write -- what is left is the path's own: the request's way in up to its
    submission, and the first event's way out (its `lag`). Unlike the time to first token it
    does not depend on where in the queue the job landed, which on a saturated worker decides
    seconds.

    `burst_*`: the same from the round's common start instant (`start_at`) instead of each
    request's own start. A client that starts N requests from one event loop runs them one
    after another, so each request's own start is later than the burst's by what the requests
    before it cost the client; from the common start, that cost counts on both paths (the
    producer's validation and planning of the jobs before it; the gateway client's writes, then
    the gateway's own work on the requests before it).

    `client_cpu_ms_per_request`: the client process's CPU over the round, per request.

    `submitted_p50_ms` / `submit_spread_ms`: the jobs' submission stamps from the common start
    (median) and from the first to the last: how long the path took to take in the whole burst,
    whatever the worker did."""
    done = [r for r in results if isinstance(r, tuple)]
    lags, paths, burst_paths, stamps = [], [], [], []
    for ttft, job_id, read_at in done:
        written = await first_text_written(client.redis, job_id)
        if written is None:
            continue
        lags.append(max(0.0, read_at - written))
        # Waited for: the end event goes out just before the result is stored.
        result = await client.result(job_id, timeout=60)
        queued_at = result.timings.queued_at
        if queued_at is not None:
            paths.append(ttft - (written - queued_at.timestamp()))
            stamps.append(queued_at.timestamp() - start_at)
            burst_paths.append((read_at - start_at) - (written - queued_at.timestamp()))
    errors = [r for r in results if isinstance(r, str)][:3]
    out = {"n": n, "completed": len(done), **summary([r[0] for r in done], lags, paths),
           "client_cpu_ms_per_request": 1000 * cpu_s / n, "errors": errors}
    if burst_paths:
        burst = [r[2] - start_at for r in done]
        out |= {"burst_p50_ms": 1000 * statistics.median(burst),
                "burst_path_p50_ms": 1000 * statistics.median(burst_paths),
                "burst_path_p95_ms": 1000 * percentile(burst_paths, 0.95),
                "submitted_p50_ms": 1000 * statistics.median(stamps),
                "submit_spread_ms": 1000 * (max(stamps) - min(stamps))}
    return out


def producer_job(client: AsyncChatQueueClient, max_new_tokens: int
                 ) -> Callable[[], Awaitable[Outcome | None]]:
    async def one() -> Outcome | None:
        started = time.perf_counter()
        job_id = await client.submit({"model": TINY_MODEL_ID, "messages": TINY_MESSAGES,
                                      "params": {"max_new_tokens": max_new_tokens,
                                                 "do_sample": False}})
        first: tuple[float, float] | None = None
        async for event in client.stream(job_id, timeout=300):
            if first is None and event.type in ("thinking", "content") and event.text:
                first = (time.perf_counter() - started, time.time())
            if event.type == "end":
                return None if first is None else (first[0], job_id, first[1])
        return None
    return one


_TEXT = re.compile(rb'"(content|reasoning)":"[^"]')


_JOB_ID = re.compile(rb"x-chatqueue-job-id: ([^\r]+)\r\n", re.IGNORECASE)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_connections(url: str, n: int) -> list[Connection]:
    host, port = url.removeprefix("http://").split(":")
    return list(await asyncio.gather(*(asyncio.open_connection(host, int(port))
                                       for _ in range(n))))


def gateway_job(url: str, max_new_tokens: int, connections: list[Connection] | None
                ) -> Callable[[], Awaitable[Outcome | None]]:
    """One stream over a plain asyncio socket: a client this light adds little CPU of its own
    to the measurement (httpx's pure-Python HTTP parsing would, on two cores).

    `connections`: kept-alive connections opened before the round, one taken per request and
    given back once its response has ended -- as the producer's client keeps its Redis
    connections warm, and as an OpenAI client keeps its pool. None: a new connection per
    request, opened inside the timed path (with 200 at once, the client's own connection set-up
    on two shared cores took 30-60 ms before the first byte was sent)."""
    body = json.dumps({"model": TINY_MODEL_ID, "messages": TINY_MESSAGES, "stream": True,
                       "max_tokens": max_new_tokens, "temperature": 0}).encode()
    host, port = url.removeprefix("http://").split(":")
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
               "Content-Type: application/json\r\n"
               + ("" if connections is not None else "Connection: close\r\n")
               + f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def one() -> Outcome | None:
        started, finished, done, seen = time.perf_counter(), False, False, b""
        first: tuple[float, float] | None = None
        job_id = None
        if connections is None:
            reader, writer = await asyncio.open_connection(host, int(port))
        else:
            reader, writer = connections.pop()
        kept = False
        try:
            writer.write(request)
            while data := await reader.read(65536):
                seen = seen[-512:] + data  # a match may straddle two reads
                if job_id is None:
                    if not seen.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(seen[:200].decode(errors="replace"))
                    if found := _JOB_ID.search(seen):
                        job_id = found.group(1).decode()
                if first is None and _TEXT.search(seen):
                    first = (time.perf_counter() - started, time.time())
                finished = finished or b'"finish_reason":"' in seen
                done = done or b"data: [DONE]" in seen
                # The response ends with [DONE], then (kept alive) the last, empty chunk.
                if done and (connections is None or seen.endswith(b"\r\n0\r\n\r\n")):
                    kept = connections is not None
                    if not finished or first is None or job_id is None:
                        return None
                    return first[0], job_id, first[1]
            return None
        finally:
            if kept:
                assert connections is not None
                connections.append((reader, writer))
            else:
                writer.close()
    return one


def run_path(path: str, n: int, max_new_tokens: int, settings: dict[str, Any], url: str,
             start_at: float, cold: bool = False) -> tuple[list[Outcome | str | None], float]:
    """One path's N jobs, all started at `start_at` (time.time()), in a process of its own:
    the two paths' clients never share an event loop or a GIL (the producer's publish threads
    held up the gateway client's sends by seconds when they did). Also returns the process's
    CPU seconds from the start to the last request's end."""
    global _CLIENT
    if _CLIENT is None:  # one warm client per process, as a backend keeps one
        _CLIENT = _LOOP.run_until_complete(_new_client(settings))
    client = _CLIENT

    async def run() -> list[Any]:
        connections = None
        if path == "gateway" and not cold:
            # Opened anew each round (uvicorn closes connections idle for 5 s), before the
            # start: not timed.
            connections = await open_connections(url, n)
        one = producer_job(client, max_new_tokens) if path == "producer" else \
            gateway_job(url, max_new_tokens, connections)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu[0] = time.process_time()
        try:
            return await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        finally:
            cpu[0] = time.process_time() - cpu[0]
            for _, writer in connections or ():
                writer.close()

    cpu = [0.0]
    outcomes = [r if r is None or isinstance(r, tuple) else repr(r)
                for r in _LOOP.run_until_complete(run())]
    return outcomes, cpu[0]


# A path process's loop and client, kept from round to round (a client made anew each round
# paid its connections and Celery's publish setup inside the measured time).
_LOOP = asyncio.new_event_loop()
_CLIENT: AsyncChatQueueClient | None = None


async def _new_client(settings: dict[str, Any]) -> AsyncChatQueueClient:
    return AsyncChatQueueClient(ProducerSettings(**settings))


def gateway_env(broker_url: str, queue: str, port: int, max_queue_length: int, workers: int
                ) -> dict[str, str]:
    """The gateway process's environment: this one's without its CHATQUEUE_* settings, and the
    benchmark's Redis, queue, port, queue bound and number of gateway processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATQUEUE_")}
    env.update({"CHATQUEUE_BROKER_URL": broker_url, "CHATQUEUE_QUEUE": queue,
                "CHATQUEUE_DEFAULT_MODEL": TINY_MODEL_ID, "CHATQUEUE_GATEWAY_PORT": str(port),
                "CHATQUEUE_GATEWAY_MAX_QUEUE_LENGTH": str(max_queue_length),
                "CHATQUEUE_GATEWAY_WORKERS": str(workers)})
    return env


def gateway_command(gateway_path: str = "") -> list[str]:
    """The command that starts `chatqueue-gateway`; with `gateway_path`, those directories
    (os.pathsep-separated) first on its import path: another checkout's gateway and producer,
    to compare two versions on the same machine load."""
    if not gateway_path:
        return [sys.executable, "-m", "gateway.cli"]
    return [sys.executable, "-c", "import sys; sys.path[:0] = sys.argv.pop(1).split("
            f"{os.pathsep!r}); from gateway.cli import main; raise SystemExit(main())",
            gateway_path]


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants alive now (uvicorn's
    worker processes under --workers), from /proc (Linux)."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        proc = Path(f"/proc/{current}")
        try:
            # Fields after the command's closing parenthesis; utime and stime are 14th, 15th.
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in (proc / "task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
    return total


async def side_by_side(pools: dict[str, ProcessPoolExecutor], client: AsyncChatQueueClient,
                       url: str, n: int, max_new_tokens: int, cold: bool = False,
                       gateway_pid: int | None = None) -> dict[str, dict[str, Any]]:
    """N jobs through each path, both paths started at the same instant from two processes.
    The gateway's row also has the gateway process's CPU over the round, per request."""
    settings = {"broker_url": client.settings.broker_url, "queue": client.settings.queue,
                "wait_timeout_s": client.settings.wait_timeout_s}
    start_at = time.time() + 1.0
    loop = asyncio.get_running_loop()
    runs = {path: loop.run_in_executor(pool, run_path, path, n, max_new_tokens, settings, url,
                                       start_at, cold)
            for path, pool in pools.items()}
    gateway_cpu = None if gateway_pid is None else process_cpu_s(gateway_pid)
    outcomes = {path: await run for path, run in runs.items()}
    if gateway_pid is not None:
        gateway_cpu = process_cpu_s(gateway_pid) - (gateway_cpu or 0.0)
    rows = {path: await tally(client, n, results, start_at, cpu_s)
            for path, (results, cpu_s) in outcomes.items()}
    if gateway_cpu is not None and "gateway" in rows:
        rows["gateway"]["gateway_cpu_ms_per_request"] = 1000 * gateway_cpu / n
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="concurrent streaming requests")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of 2 x N jobs, each path's N side by side")
    parser.add_argument("--model-dir", type=Path, help="default: the tiny test model")
    parser.add_argument("--cold-connections", action="store_true",
                        help="a new HTTP connection per gateway request, opened in the timed "
                             "path (default: kept-alive connections opened before each round)")
    parser.add_argument("--gateway-workers", type=int, default=1,
                        help="gateway processes (CHATQUEUE_GATEWAY_WORKERS)")
    parser.add_argument("--gateway-path", default="",
                        help="directories put first on the gateway process's import path "
                             "(os.pathsep-separated): e.g. another checkout's gateway package, "
                             "to compare two versions on the same worker and clients")
    parser.add_argument("--alternate", action="store_true",
                        help="each round runs one path's N jobs, then the other's (which "
                             "goes first alternates), instead of both at once: each path's "
                             "jobs alone on the worker and the cores")
    parser.add_argument("--worker-nice", type=int, default=0,
                        help="the worker's niceness (0-19): at 19 it runs on what CPU the "
                             "gateway, the clients and Redis leave, as a GPU worker's model "
                             "leaves the host's cores to them")
    parser.add_argument("--note", default="", help="written into the results: what else ran")
    parser.add_argument("--out", type=Path,
                        default=REPO_ROOT / "benchmarks" / "results" / "gateway_load.json")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 1000:
        parser.error("--n: 1..1000")

    started_utc = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_at_start = os.getloadavg()[0]
    model_dir = args.model_dir or tiny_model_dir()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"gateway-load-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with redis_server() as redis:
        worker = spawn_worker(worker_env(redis.url, model_dir, QUEUE,
                                         concurrency=str(min(args.n, 64)),
                                         max_batch_size=str(min(args.n, 64))), log_dir,
                             nice=args.worker_nice)
        port = free_port()
        env = gateway_env(redis.url, QUEUE, port, 10 * args.n, args.gateway_workers)
        gateway = subprocess.Popen(gateway_command(args.gateway_path), cwd=REPO_ROOT,
                                   env=env, stdout=(log_dir / "gateway.log").open("w"),
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(worker)
            wait_listed(gateway, url, TINY_MODEL_ID)
            settings = ProducerSettings(broker_url=redis.url, queue=QUEUE, wait_timeout_s=300)
            rows: list[dict[str, Any]] = []

            spawn = multiprocessing.get_context("spawn")
            pools = {path: ProcessPoolExecutor(1, mp_context=spawn)
                     for path in ("producer", "gateway")}

            async def measure() -> None:
                async with AsyncChatQueueClient(settings) as client:
                    await side_by_side(pools, client, url, 4, args.max_new_tokens,
                                       args.cold_connections)  # warm-up
                    for round_ in range(args.rounds):
                        if args.alternate:  # one path at a time, the first one in turn
                            order = ["producer", "gateway"][::1 if round_ % 2 else -1]
                            measured = {}
                            for path in order:
                                measured |= await side_by_side(
                                    {path: pools[path]}, client, url, args.n,
                                    args.max_new_tokens, args.cold_connections, gateway.pid)
                        else:
                            measured = await side_by_side(pools, client, url, args.n,
                                                          args.max_new_tokens,
                                                          args.cold_connections, gateway.pid)
                        for name, row in measured.items():
                            rows.append({"round": round_, "path": name, **row})
                            print(json.dumps(rows[-1]), flush=True)

            try:
                asyncio.run(measure())
            finally:
                for pool in pools.values():
                    pool.shutdown()
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            worker.stop()

    def pooled(path: str, key: str) -> float:
        return float(statistics.median(r[key] for r in rows if r["path"] == path and key in r))

    def paired(key: str) -> list[tuple[float, float]]:
        """(producer, gateway) of each round."""
        by_round: dict[int, dict[str, float]] = {}
        for row in rows:
            if key in row:
                by_round.setdefault(row["round"], {})[row["path"]] = row[key]
        return [(r["producer"], r["gateway"]) for r in by_round.values() if len(r) == 2]

    from benchmarks.run import cpu_model  # here: it imports torch, which the clients need not

    result: dict[str, Any] = {
        "note": args.note,
        "mode": "alternate" if args.alternate else "side_by_side",
        "gateway_connections": "new per request, timed" if args.cold_connections else
        "kept alive, opened before each round",
        "n_per_path": args.n, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "gateway_workers": args.gateway_workers, "gateway_path": args.gateway_path,
        "worker_nice": args.worker_nice,
        "commit": _commit(), "gateway_hiredis": _has_hiredis(args.gateway_path),
        "started": started_utc,
        "cpu": os.cpu_count(), "cpu_model": cpu_model(), "load_avg_1m_start": load_at_start,
        "load_avg_1m": os.getloadavg()[0],
        "lost": sum(r["n"] - r["completed"] for r in rows),
    }
    for key in ("p50_ms", "p95_ms", "lag_p50_ms", "lag_p95_ms", "path_p50_ms", "path_p95_ms",
                "burst_path_p50_ms", "burst_path_p95_ms", "submitted_p50_ms",
                "submit_spread_ms", "client_cpu_ms_per_request"):
        pairs = paired(key)
        if not pairs:
            continue
        result[f"producer_{key}"] = pooled("producer", key)
        result[f"gateway_{key}"] = pooled("gateway", key)
        # Per round, then the median of the rounds: each round's pair saw the same load.
        result[f"gateway_overhead_{key}"] = statistics.median(g - p for p, g in pairs)
        if ratios := [g / p for p, g in pairs if p > 0]:
            result[f"gateway_over_producer_{key.removesuffix('_ms')}"] = statistics.median(
                ratios)
    gateway_cpu = [r["gateway_cpu_ms_per_request"] for r in rows
                   if "gateway_cpu_ms_per_request" in r]
    if gateway_cpu:
        # Its own CPU, whatever else the cores ran: less noisy than the latencies.
        result["gateway_cpu_ms_per_request"] = statistics.median(gateway_cpu)
    result["rows"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0 if result["lost"] == 0 else 1


def _commit() -> str:
    """The commit measured, with "+changes" when the worktree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + (
        "+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _has_hiredis(gateway_path: str) -> bool:
    """Whether redis-py parses the gateway's replies with hiredis (its extra installs it), on
    the gateway process's import path."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path[:0] = sys.argv[1].split("
         f"{os.pathsep!r}) if sys.argv[1] else []; import redis.utils; "
         "print(redis.utils.HIREDIS_AVAILABLE)", gateway_path],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


if __name__ == "__main__":
    raise SystemExit(main())
