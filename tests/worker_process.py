"""Start real ``sequencer`` worker processes for tests, and wait on them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from smtp_server import free_port

ROOT = Path(__file__).resolve().parent.parent

WORKER = (
    "import sys; from sequencer.worker import run_worker; "
    "sys.exit(run_worker(host='127.0.0.1'))"
)


def start_worker(worker_id: str, log: Path, **settings: str) -> subprocess.Popen[bytes]:
    """A headless worker (scheduler + tracking) in a process of its own.

    ``settings`` are ``SEQUENCER_*`` variables without the prefix, e.g.
    ``SMTP_URL="smtp://..."``; the test's own database settings are inherited.
    """
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "SEQUENCER_WORKER_ID": worker_id,
            "SEQUENCER_TRACKING_PORT": str(free_port()),
            "SEQUENCER_TICK_SECONDS": "0.2",
        }
    )
    env.update({f"SEQUENCER_{name}": value for name, value in settings.items()})
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def wait_until(condition: Callable[[], bool], *, timeout: float = 120.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; say which."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def stop(process: subprocess.Popen[bytes], *, timeout: float = 60.0) -> int:
    """Ask a worker to stop (SIGTERM) and wait for its exit code."""
    if process.poll() is None:
        process.terminate()
    return process.wait(timeout)
