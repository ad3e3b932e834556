"""``nli-serve``: run the service with uvicorn.

SIGTERM or Ctrl-C: stop accepting connections, finish in-flight requests, mark a running
evaluation job failed (it can be resubmitted), exit 0. A base model that cannot be loaded is
logged and ends the process with exit code 1; bad settings with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from app.logs import configure_logging
from app.serving_stack import log_serving_stack
from app.settings import load_settings
from nli.errors import ConfigError

logger = logging.getLogger("app.cli")

EXIT_LOAD_FAILED = 1
EXIT_BAD_SETTINGS = 2
GRACEFUL_SHUTDOWN_S = 30


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nli-serve``."""
    parser = argparse.ArgumentParser(prog="nli-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="interface to bind (default: NLI_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default: NLI_PORT, 8000)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--no-access-log", action="store_true", help="one log line per request is the default"
    )
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.no_access_log:
        logging.getLogger("app.access").setLevel(logging.WARNING)

    import uvicorn

    from app.main import create_app

    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    try:
        settings = load_settings(**overrides)
        failures: list[str] = []
        server: uvicorn.Server | None = None

        def on_fatal(message: str) -> None:
            failures.append(message)
            if server is not None:
                server.should_exit = True

        app = create_app(settings, on_fatal=on_fatal)
    except ConfigError as exc:
        logger.error("%s", exc.message)
        return EXIT_BAD_SETTINGS
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our handlers (request ids in every line)
        access_log=False,  # the middleware logs requests, with their ids
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
    )
    log_serving_stack()
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then re-raises the signal to
    # the handler it found installed: make that a no-op, so a clean shutdown exits 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _after_graceful_shutdown)
    server.run()
    if failures:
        logger.error("exiting: %s", failures[0])
        return EXIT_LOAD_FAILED
    if not server.started:
        return EXIT_LOAD_FAILED
    return 0


def _after_graceful_shutdown(signum: int, frame: object) -> None:
    logger.info("stopped by signal %d", signum)


if __name__ == "__main__":
    sys.exit(main())
