"""How fast the gateway takes in a burst, against the producer's own submit, with no worker.

gateway_load measures the whole path with a worker prefilling and decoding the burst on the
same cores; this isolates the way in. A real redis-server and a real `chatqueue-gateway`
process; the queue is announced as live (a presence entry, as a worker would write it) but
nothing drains it, so nothing else competes for the CPU. Each round writes N streaming
requests at once over kept-alive connections (opened before the round), waits until the N
messages are in the queue and reads their submission stamps (the `submitted_at` each message
carries); then the producer's AsyncChatQueueClient submits N jobs in one gather, and the same.
Each round starts once the gateway answers no request (the last round's disconnects and their
cancels done) and its connections are accepted. Prints and writes (--out) per path the stamps'
p50 and last from the burst's start, and the gateway process's CPU per request over its intake
(up to the last message queued).

    .venv/bin/python -m benchmarks.gateway_intake --n 200 --rounds 5 [--gateway-workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import redis as redis_py

from benchmarks.gateway_load import (
    _commit,
    _has_hiredis,
    gateway_command,
    gateway_env,
    open_connections,
    process_cpu_s,
)
from chatqueue_dev.models import TINY_MESSAGES, TINY_MODEL_ID
from chatqueue_dev.servers import REPO_ROOT, free_port, redis_server, wait_listed
from producer import AsyncChatQueueClient, ProducerSettings
from producer.settings import PRESENCE_KEY, presence_member

QUEUE = "gateway-intake"


def stamps(raw: redis_py.Redis, start: float) -> list[float]:
    """The queued messages' submission stamps, in seconds after `start`."""
    found = []
    for item in raw.lrange(QUEUE, 0, -1):
        body = json.loads(base64.b64decode(json.loads(item)["body"]))
        found.append(body[1]["submitted_at"] - start)  # Celery's protocol 2: args, kwargs, ...
    return found


async def wait_queued(raw: redis_py.Redis, n: int) -> None:
    while raw.llen(QUEUE) < n:
        await asyncio.sleep(0.002)


async def settled(url: str) -> None:
    """Until the gateway answers no completion (the last round's disconnects cancelled)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while True:
            text = (await http.get("/metrics")).text
            if 'chatqueue_gateway_in_flight{route="/v1/chat/completions"} 0.0' in text:
                return
            await asyncio.sleep(0.05)


async def measure(url: str, gateway_pid: int, settings: ProducerSettings, raw: redis_py.Redis,
                  n: int, rounds: int) -> list[dict[str, float]]:
    body = json.dumps({"model": TINY_MODEL_ID, "messages": TINY_MESSAGES, "stream": True,
                       "max_tokens": 16}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.removeprefix('http://')}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    rows = []
    async with AsyncChatQueueClient(settings) as client:
        for round_ in range(rounds + 1):  # the first warms up
            raw.delete(QUEUE)
            await settled(url)
            connections = await open_connections(url, n)
            await asyncio.sleep(0.2)  # accepted by the gateway outside the measured time
            cpu = process_cpu_s(gateway_pid)
            start = time.time()
            for _, writer in connections:
                writer.write(request)
            await wait_queued(raw, n)
            cpu = process_cpu_s(gateway_pid) - cpu
            gateway = stamps(raw, start)
            for _, writer in connections:
                writer.close()  # the gateway cancels their jobs
            raw.delete(QUEUE)
            start = time.time()
            await asyncio.gather(*(client.submit({"model": TINY_MODEL_ID,
                                                  "messages": TINY_MESSAGES})
                                   for _ in range(n)))
            producer = stamps(raw, start)
            raw.delete(QUEUE)
            if round_ == 0:
                continue
            rows.append({"gateway_p50_ms": 1000 * statistics.median(gateway),
                         "gateway_last_ms": 1000 * max(gateway),
                         "producer_p50_ms": 1000 * statistics.median(producer),
                         "producer_last_ms": 1000 * max(producer),
                         "gateway_cpu_ms_per_request": 1000 * cpu / n})
            print(json.dumps({k: round(v, 2) for k, v in rows[-1].items()}), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="requests at once")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gateway-workers", type=int, default=1,
                        help="gateway processes (CHATQUEUE_GATEWAY_WORKERS)")
    parser.add_argument("--gateway-path", default="",
                        help="directories put first on the gateway process's import path "
                             "(another checkout's gateway and producer: an A/B on one machine)")
    parser.add_argument("--note", default="", help="written into the results: what else ran")
    parser.add_argument("--out", type=Path,
                        default=REPO_ROOT / "benchmarks" / "results" / "gateway_intake.json")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"gateway-intake-{os.getpid()}.log"
    with redis_server() as server:
        raw = redis_py.Redis.from_url(server.url)
        raw.zadd(PRESENCE_KEY, {presence_member("celery@intake", TINY_MODEL_ID, QUEUE): 4e9})
        port = free_port()
        gateway = subprocess.Popen(
            gateway_command(args.gateway_path), cwd=REPO_ROOT,
            env=gateway_env(server.url, QUEUE, port, 10 * args.n, args.gateway_workers),
            stdout=log.open("w"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_listed(gateway, url, TINY_MODEL_ID)
            rows = asyncio.run(measure(url, gateway.pid,
                                       ProducerSettings(broker_url=server.url, queue=QUEUE),
                                       raw, args.n, args.rounds))
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)

    from benchmarks.run import cpu_model  # here: it imports torch, which the clients need not

    result: dict[str, Any] = {
        "note": args.note, "commit": _commit(), "gateway_path": args.gateway_path,
        "gateway_hiredis": _has_hiredis(args.gateway_path),
        "n": args.n, "rounds": args.rounds, "gateway_workers": args.gateway_workers,
        "cpu": os.cpu_count(), "cpu_model": cpu_model(), "load_avg_1m_start": load_at_start,
        "load_avg_1m": os.getloadavg()[0],
        **{f"median_{key}": statistics.median(row[key] for row in rows) for key in rows[0]},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
