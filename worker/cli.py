"""`chatqueue-worker`: run a worker, check its health, download a model, build the local
demo/test models."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="chatqueue-worker", description=__doc__)
    parser.add_argument("command", choices=["run", "health", "download", "build-model"])
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the command's own arguments")
    args = parser.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "download":
        from worker.download import main as download_main

        return download_main(rest)
    if args.command == "build-model":
        # Dev tooling (chatqueue_dev/), not part of a production worker: imported only when
        # asked for, and absent from the worker image.
        try:
            from chatqueue_dev.models import main as build_main
        except ModuleNotFoundError as exc:
            if exc.name != "chatqueue_dev":
                raise
            print("build-model is dev tooling (the chatqueue_dev package): run it from a "
                  "checkout installed with `make install`", file=sys.stderr)
            return 2

        return build_main(rest)
    if args.command == "health":
        return health(rest)
    return run_worker(rest)


def health(argv: list[str]) -> int:
    """Exit 0 when the worker behind a metrics port has its model loaded and consumes its
    queue (a container or load-balancer health check); 1 with the reason otherwise."""
    from urllib.error import URLError
    from urllib.request import urlopen

    parser = argparse.ArgumentParser(prog="chatqueue-worker health")
    parser.add_argument("--url", help="metrics URL (default: from CHATQUEUE_METRICS_*)")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    url = args.url
    if url is None:
        from worker.settings import WorkerSettings

        settings = WorkerSettings()
        if settings.metrics_port is None:
            print("unhealthy: CHATQUEUE_METRICS_PORT is not set; nothing to ask", file=sys.stderr)
            return 1
        url = f"http://{settings.metrics_addr}:{settings.metrics_port}/metrics"
    try:
        with urlopen(url, timeout=args.timeout) as response:
            text = response.read().decode()
    except (URLError, OSError) as exc:
        print(f"unhealthy: {url} does not answer ({exc})", file=sys.stderr)
        return 1
    for metric, reason in (("chatqueue_model_loaded", "model not loaded"),
                           ("chatqueue_consuming", "not consuming its queue")):
        lines = [line for line in text.splitlines() if line.startswith(metric)]
        if not lines or not all(line.rstrip().endswith(" 1.0") for line in lines):
            print(f"unhealthy: {reason} ({lines or f'no {metric} metric'})", file=sys.stderr)
            return 1
    print("healthy: model loaded, consuming its queue")
    return 0


def run_worker(extra: list[str]) -> int:
    """Start Celery's worker on our app; extra arguments go to `celery worker` unchanged."""
    from worker.app import app, settings

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.log_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    # Without mingle and gossip: chatqueue uses neither (revoke is our cancel, kept in Redis,
    # not in a worker's memory to sync), and mingle's hello is a broadcast on the control
    # channel, which the worker's Redis user may not publish to (README "Security").
    app.worker_main(
        ["worker", f"--loglevel={settings.log_level}", "-Q", settings.serving_queue,
         "--without-mingle", "--without-gossip", *extra]
    )
    # worker_main drops the worker's exit status; a worker that stopped because its engine
    # died must still exit non-zero (worker/watchdog.py).
    from worker import app as worker_app

    return worker_app.exit_code


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message (+ traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


if __name__ == "__main__":
    raise SystemExit(main())
