"""`chatqueue-gateway`: serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from gateway.settings import GatewaySettings
from producer.settings import ProducerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatqueue-gateway",
        description="OpenAI-compatible HTTP API over chatqueue (settings: CHATQUEUE_GATEWAY_*, "
                    "CHATQUEUE_* for Redis).")
    parser.add_argument("--host", help="address to listen on (CHATQUEUE_GATEWAY_HOST)")
    parser.add_argument("--port", type=int, help="port (CHATQUEUE_GATEWAY_PORT)")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port))
                 if value is not None}
    settings = GatewaySettings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    digests = settings.key_digests()
    if not digests and settings.listens_beyond_loopback():
        print(f"chatqueue-gateway: refusing to listen on {settings.host}: no API key is "
              "configured (set CHATQUEUE_GATEWAY_API_KEYS or CHATQUEUE_GATEWAY_API_KEYS_FILE), "
              "and without one only a loopback address is served", file=sys.stderr)
        return 2

    import uvicorn  # the server only where it runs

    from gateway.app import create_app

    app = create_app(settings, ProducerSettings(), digests)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                proxy_headers=False, server_header=False, access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
