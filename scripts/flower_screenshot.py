"""Take docs/flower.png: a real Flower (basic auth) watching a real worker that ran real jobs.

Needs flower (the dev extra) and Debian's chromium. Everything started here is stopped.
Run: .venv/bin/python -m scripts.flower_screenshot
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from chatqueue_dev.models import TINY_MESSAGES, TINY_MULTI_TURN, build_tiny_qwen
from chatqueue_dev.servers import (
    REPO_ROOT,
    free_port,
    redis_server,
    spawn_worker,
    wait_ready,
    wait_until,
    worker_env,
)
from producer import ChatQueueClient, ChatRequest, JobFailed, ProducerSettings

USER, PASSWORD = "operator", uuid.uuid4().hex
OUT = REPO_ROOT / "docs" / "flower.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def flower_answers(url: str) -> bool:
    request = Request(url)
    try:
        urlopen(request, timeout=2)
    except HTTPError as exc:
        return exc.code == 401  # up, and refusing us without credentials: what we want
    except OSError:
        return False
    return False


def main() -> int:
    model_dir = REPO_ROOT / ".cache" / "models" / "flower-tiny"
    build_tiny_qwen(model_dir)
    logs = Path(tempfile.mkdtemp(prefix="chatqueue-flower-"))
    with redis_server() as redis:
        port = free_port()
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "--broker", redis.url, "flower", f"--port={port}",
             "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}"],
            stdout=(logs / "flower.log").open("w"), stderr=subprocess.STDOUT,
        )
        worker = spawn_worker(worker_env(redis.url, model_dir, "flower-demo"), logs)
        try:
            wait_until(lambda: flower_answers(f"http://127.0.0.1:{port}/"), timeout=60,
                       what="flower")
            wait_ready(worker)
            settings = ProducerSettings(broker_url=redis.url, queue="flower-demo")
            with ChatQueueClient(settings) as client:
                jobs = [client.submit(ChatRequest.model_validate(
                    {"messages": messages, "params": {"do_sample": False, **params}}))
                    for messages, params in [(TINY_MESSAGES, {}), (TINY_MULTI_TURN, {}),
                                             (TINY_MESSAGES, {"enable_thinking": False}),
                                             (TINY_MESSAGES, {"max_new_tokens": 4})]]
                for job_id in jobs:
                    client.result(job_id, timeout=120)
                refused = client.submit(ChatRequest.model_validate(
                    {"messages": TINY_MESSAGES, "params": {"max_new_tokens": 100_000}}))
                with contextlib.suppress(JobFailed):  # over the worker's cap: shown as FAILURE
                    client.result(refused, timeout=120)
            url = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}/tasks"
            subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={logs / 'chrome'}",
                            "--window-size=1400,700", "--virtual-time-budget=8000",
                            f"--screenshot={OUT}", url], check=True, timeout=120,
                           capture_output=True)
        finally:
            worker.stop()
            flower.terminate()
            flower.wait(timeout=10)
    print(OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
