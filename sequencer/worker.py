"""The headless worker: the scheduler plus the tracking routes on their own port.

For deployments that split sending from the dashboard, or that expose only
tracking to the internet. ``python -m sequencer worker`` runs it until
SIGTERM or Ctrl+C; the stop is clean: the current batch finishes, queued
tracking events are written, deliveries not yet claimed stay queued.
"""

from __future__ import annotations

import logging
import signal

import uvicorn

from sequencer import tracking
from sequencer.config import get_settings
from sequencer.scheduler import start_scheduler, stop_scheduler

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr, unless the application already set up logging."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    # A pass still running when the next is due is expected (long sends): the
    # next one waits, which APScheduler would report as a warning every tick.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def run_worker(host: str = "0.0.0.0", port: int | None = None) -> int:
    """Run the scheduler and serve tracking until stopped; returns an exit code.

    uvicorn owns the signals: on SIGTERM or SIGINT it stops serving and runs
    the tracking lifespan exit (which flushes events); the scheduler is
    stopped after it.
    """
    configure_logging()
    settings = get_settings()
    port = settings.tracking_port if port is None else port
    config = uvicorn.Config(
        tracking.tracking_app(),
        host=host,
        port=port,
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT, then re-raises the signal to the handler
    # it found: make that one harmless so the scheduler is stopped cleanly.
    stopped_by: list[int] = []
    previous = {
        number: signal.signal(number, lambda number, _frame: stopped_by.append(number))
        for number in (signal.SIGTERM, signal.SIGINT)
    }
    start_scheduler()
    logger.info(
        "worker %s running; tracking on http://%s:%s",
        settings.worker_id,
        host,
        port,
    )
    try:
        server.run()
    finally:
        stop_scheduler()
        for number, handler in previous.items():
            signal.signal(number, handler)
        logger.info("worker %s stopped", settings.worker_id)
    return 0 if server.started else 1
