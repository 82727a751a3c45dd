"""`chatqueue-worker`: run a worker, download a model, build the local demo/test models."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="chatqueue-worker", description=__doc__)
    parser.add_argument("command", choices=["run", "download", "build-model"])
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the command's own arguments")
    args = parser.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "download":
        from worker.download import main as download_main

        return download_main(rest)
    if args.command == "build-model":
        from worker.devmodels import main as build_main

        return build_main(rest)
    return run_worker(rest)


def run_worker(extra: list[str]) -> int:
    """Start Celery's worker on our app; extra arguments go to `celery worker` unchanged."""
    from worker.app import app, settings

    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.worker_main(["worker", f"--loglevel={settings.log_level}", "-Q", settings.serving_queue, *extra])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
