"""Time to first token through the gateway against the producer's own stream, on loopback.

Starts a real redis-server, one worker on the tiny test model (or --model-dir) and a real
`chatqueue-gateway` process, then runs the same N streaming jobs twice, each time all at once:

- producer: AsyncChatQueueClient.submit + stream; time to first token = submit start -> the
  first thinking or content event;
- gateway: N concurrent POST /v1/chat/completions with stream: true over HTTP (SSE read by a
  minimal asyncio client);
  time to first token = request start -> the first chunk carrying text.

Prints and writes (--out) p50 / p95 of both, the difference, and how many requests ended with
their final chunk and [DONE] (none may be lost). Bounded: N requests, --max-new-tokens each.

    .venv/bin/python -m benchmarks.gateway_load --n 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from chatqueue_dev.models import TINY_MESSAGES, TINY_MODEL_ID
from chatqueue_dev.servers import (
    REPO_ROOT,
    free_port,
    redis_server,
    spawn_worker,
    tiny_model_dir,
    wait_ready,
    wait_until,
    worker_env,
)
from producer import AsyncChatQueueClient, ProducerSettings

QUEUE = "gateway-load"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(ttfts: list[float]) -> dict[str, float]:
    if not ttfts:
        return {}
    return {"p50_ms": 1000 * statistics.median(ttfts), "p95_ms": 1000 * percentile(ttfts, 0.95),
            "max_ms": 1000 * max(ttfts)}


async def producer_run(client: AsyncChatQueueClient, n: int, max_new_tokens: int
                       ) -> dict[str, Any]:
    async def one() -> float | None:
        started = time.perf_counter()
        job_id = await client.submit({"model": TINY_MODEL_ID, "messages": TINY_MESSAGES,
                                      "params": {"max_new_tokens": max_new_tokens,
                                                 "do_sample": False}})
        first = None
        async for event in client.stream(job_id, timeout=300):
            if first is None and event.type in ("thinking", "content") and event.text:
                first = time.perf_counter() - started
            if event.type == "end":
                return first
        return None

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    ttfts = [r for r in results if isinstance(r, float)]
    return {"n": n, "completed": len(ttfts), **summary(ttfts)}


_TEXT = re.compile(rb'"(content|reasoning)":"[^"]')


async def gateway_run(url: str, n: int, max_new_tokens: int) -> dict[str, Any]:
    """N streams at once over plain asyncio sockets: a client this light adds little CPU of
    its own to the measurement (httpx's pure-Python HTTP parsing would, on two cores)."""
    body = json.dumps({"model": TINY_MODEL_ID, "messages": TINY_MESSAGES, "stream": True,
                       "max_tokens": max_new_tokens, "temperature": 0}).encode()
    host, port = url.removeprefix("http://").split(":")
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
               "Content-Type: application/json\r\nConnection: close\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def one() -> float | None:
        started, first, finished, seen = time.perf_counter(), None, False, b""
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(request)
            while data := await reader.read(65536):
                seen = seen[-512:] + data  # a match may straddle two reads
                if not seen.startswith(b"HTTP/1.1 200") and len(seen) == len(data):
                    raise RuntimeError(seen[:200].decode(errors="replace"))
                if first is None and _TEXT.search(seen):
                    first = time.perf_counter() - started
                finished = finished or b'"finish_reason":"' in seen
                if b"data: [DONE]" in seen:
                    return first if finished else None
            return None
        finally:
            writer.close()

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    ttfts = [r for r in results if isinstance(r, float)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)][:3]
    return {"n": n, "completed": len(ttfts), **summary(ttfts), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="concurrent streaming requests")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2,
                        help="producer, gateway, producer, gateway, ...: same load for each")
    parser.add_argument("--model-dir", type=Path, help="default: the tiny test model")
    parser.add_argument("--out", type=Path,
                        default=REPO_ROOT / "benchmarks" / "results" / "gateway_load.json")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 1000:
        parser.error("--n: 1..1000")

    model_dir = args.model_dir or tiny_model_dir()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"gateway-load-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with redis_server() as redis:
        worker = spawn_worker(worker_env(redis.url, model_dir, QUEUE,
                                         concurrency=str(min(args.n, 64)),
                                         max_batch_size=str(min(args.n, 64))), log_dir)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATQUEUE_")}
        env.update({"CHATQUEUE_BROKER_URL": redis.url, "CHATQUEUE_QUEUE": QUEUE,
                    "CHATQUEUE_DEFAULT_MODEL": TINY_MODEL_ID,
                    "CHATQUEUE_GATEWAY_PORT": str(port),
                    "CHATQUEUE_GATEWAY_MAX_QUEUE_LENGTH": str(10 * args.n)})
        gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli"], cwd=REPO_ROOT,
                                   env=env, stdout=(log_dir / "gateway.log").open("w"),
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(worker)
            wait_until(lambda: TINY_MODEL_ID in _get(f"{url}/v1/models"), timeout=60,
                       what="the gateway to list the model")
            settings = ProducerSettings(broker_url=redis.url, queue=QUEUE, wait_timeout_s=300)
            rows: list[dict[str, Any]] = []

            async def measure() -> None:
                async with AsyncChatQueueClient(settings) as client:
                    await producer_run(client, 4, args.max_new_tokens)  # warm-up
                    await gateway_run(url, 4, args.max_new_tokens)
                    for round_ in range(args.rounds):
                        for name, run in (
                                ("producer", producer_run(client, args.n, args.max_new_tokens)),
                                ("gateway", gateway_run(url, args.n, args.max_new_tokens))):
                            row = {"round": round_, "path": name, **await run}
                            rows.append(row)
                            print(json.dumps(row), flush=True)

            asyncio.run(measure())
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            worker.stop()

    def pooled(path: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["path"] == path and key in r)

    result = {
        "n": args.n, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "cpu": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
        "lost": sum(r["n"] - r["completed"] for r in rows),
        "producer_p50_ms": pooled("producer", "p50_ms"),
        "gateway_p50_ms": pooled("gateway", "p50_ms"),
        "producer_p95_ms": pooled("producer", "p95_ms"),
        "gateway_p95_ms": pooled("gateway", "p95_ms"),
        "rows": rows,
    }
    result["gateway_overhead_p50_ms"] = result["gateway_p50_ms"] - result["producer_p50_ms"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0 if result["lost"] == 0 else 1


def _get(url: str) -> str:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.TransportError:
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
