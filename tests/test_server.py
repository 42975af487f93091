"""The dashboard server: its lifespan runs exactly one scheduler, then stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from smtp_server import free_port
from sqlalchemy import Engine, select
from sqlmodel import Session
from worker_process import ROOT, wait_until

from sequencer import scheduler
from sequencer.models import WorkerHeartbeat

pytestmark = pytest.mark.slow


def test_lifespan_starts_one_scheduler_and_stops_it(engine: Engine) -> None:
    from sequencer import server

    async def serve_briefly() -> None:
        async with server.lifespan(server.app):
            running = scheduler.current_scheduler()
            assert running is not None and running.running
            assert scheduler.start_scheduler() is running
        assert scheduler.current_scheduler() is None
        assert not running.running

    asyncio.run(serve_briefly())


def test_server_process_runs_its_scheduler_until_sigterm(
    engine: Engine, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SEQUENCER_TICK_SECONDS": "0.2",
    }
    env.pop("SEQUENCER_WORKER_ID", None)
    log = tmp_path / "server.log"
    command = (
        "from sequencer.server import run_server; "
        f"run_server(host='127.0.0.1', port={port})"
    )
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", command],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/_stcore/health", timeout=2).text == "ok"
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, timeout=60), log.read_text()

        # Five tabs at once: still one scheduler in the process.
        with ThreadPoolExecutor(5) as pool:
            pages = list(pool.map(lambda _n: httpx.get(base, timeout=10), range(5)))
        assert {page.status_code for page in pages} == {200}
        assert httpx.get(f"{base}/t/o/forged", timeout=5).status_code == 404

        def beating() -> bool:
            with Session(engine) as check:
                return bool(check.scalars(select(WorkerHeartbeat)).all())

        assert wait_until(beating, timeout=30), log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)

    output_text = log.read_text()
    with Session(engine) as check:
        beats = check.scalars(select(WorkerHeartbeat)).all()
    assert [beat.pid for beat in beats] == [process.pid]
    assert output_text.count("scheduler of worker") == 2, output_text
    assert "started: a pass every 0.2s" in output_text
    assert "dashboard server stopped" in output_text
