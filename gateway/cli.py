"""`chatqueue-gateway`: serve the OpenAI-compatible API with uvicorn, in one process or in
several (CHATQUEUE_GATEWAY_WORKERS) sharing the port."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from typing import Any

from gateway.settings import GatewaySettings
from producer.settings import ProducerSettings

# Where the processes of a multi-process gateway keep their metrics (prometheus_client's
# multiprocess mode reads this variable; the CLI sets it for the processes it starts).
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatqueue-gateway",
        description="OpenAI-compatible HTTP API over chatqueue (settings: CHATQUEUE_GATEWAY_*, "
                    "CHATQUEUE_* for Redis).")
    parser.add_argument("--host", help="address to listen on (CHATQUEUE_GATEWAY_HOST)")
    parser.add_argument("--port", type=int, help="port (CHATQUEUE_GATEWAY_PORT)")
    parser.add_argument("--workers", type=int,
                        help="processes serving the port (CHATQUEUE_GATEWAY_WORKERS, default 1)")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port),
                                               ("workers", args.workers))
                 if value is not None}
    settings = GatewaySettings(**overrides)
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    digests = settings.key_digests()
    if not digests and settings.listens_beyond_loopback():
        print(f"chatqueue-gateway: refusing to listen on {settings.host}: no API key is "
              "configured (set CHATQUEUE_GATEWAY_API_KEYS or CHATQUEUE_GATEWAY_API_KEYS_FILE), "
              "and without one only a loopback address is served", file=sys.stderr)
        return 2

    import uvicorn  # the server only where it runs

    options: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": "info",
                               "proxy_headers": False, "server_header": False,
                               "access_log": False}
    if settings.workers == 1:
        from gateway.app import create_app

        uvicorn.run(create_app(settings, ProducerSettings(), digests), **options)
        return 0
    # uvicorn binds the port here and starts the processes, which each build the app from the
    # environment (app_of_a_worker) and accept connections on the one socket. Their metrics
    # go into a directory of this run's own: prometheus_client's multiprocess mode needs one
    # that no earlier run left files in.
    with tempfile.TemporaryDirectory(prefix="chatqueue-gateway-metrics-") as metrics_dir:
        os.environ[METRICS_DIR_VARIABLE] = metrics_dir
        uvicorn.run("gateway.cli:app_of_a_worker", factory=True, workers=settings.workers,
                    **options)
    return 0


def app_of_a_worker() -> Any:
    """The app of one of several gateway processes (uvicorn's factory, in each of them): the
    settings from the environment and .env, as the CLI read them (--host, --port and
    --workers only matter to the CLI itself); metrics counted across the processes."""
    from gateway.app import create_app

    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    settings = GatewaySettings()
    return create_app(settings, ProducerSettings(), settings.key_digests(),
                      metrics_dir=os.environ[METRICS_DIR_VARIABLE])


if __name__ == "__main__":
    raise SystemExit(main())
