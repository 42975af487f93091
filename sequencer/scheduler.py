"""The background scheduler: one per process, a pass every few seconds.

A pass reads "now" once, then: beats the heartbeat, runs the sequences of
pending record events, cleans up after dead workers, and sends due
emailings. Passes never overlap (``max_instances=1``) and missed ones collapse
into one (``coalesce``): a pass that overruns delays the next instead of
losing it, and whatever was due is picked up then. A separate heartbeat job
keeps beating during a long send, so the dashboard can tell a busy worker
from a dead one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import insert, update
from sqlmodel import Session, select

from sequencer import delivery, engine
from sequencer.config import get_settings
from sequencer.db import get_engine, session_scope
from sequencer.models import WorkerHeartbeat
from sequencer.timeutil import utcnow

logger = logging.getLogger(__name__)

PASS_SECONDS = 30.0
"""Longest a pass keeps claiming new batches; the rest goes on the next pass."""
HEARTBEAT_SECONDS = 10.0
ALIVE_SECONDS = 60.0
"""A worker whose last beat is older than this is shown as stopped."""

_lock = threading.Lock()
_scheduler: BackgroundScheduler | None = None
_started_at: datetime | None = None


# --- Heartbeat -----------------------------------------------------------------


def beat(
    *, now: datetime | None = None, last_pass: dict[str, Any] | None = None
) -> None:
    """Record that this worker is alive (and, after a pass, what it did)."""
    settings = get_settings()
    now = now or utcnow()
    values: dict[str, Any] = {"last_beat": now}
    if last_pass is not None:
        values["last_pass"] = last_pass
    with session_scope() as session:
        updated = session.execute(
            update(WorkerHeartbeat)
            .where(WorkerHeartbeat.worker_id == settings.worker_id)
            .values(**values)
        ).rowcount
        if not updated:
            session.execute(
                insert(WorkerHeartbeat).values(
                    worker_id=settings.worker_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=_started_at or now,
                    last_beat=now,
                    last_pass=last_pass or {},
                )
            )
            logger.info("worker %s registered", settings.worker_id)


def _beat_job() -> None:
    try:
        beat()
    except Exception:
        logger.exception("the heartbeat failed")


def worker_status(session: Session, *, now: datetime | None = None) -> pd.DataFrame:
    """Every worker that ever beat: when, whether it looks alive, its last pass.

    A worker that stopped cleanly said so in its last beat; one that died
    just stops beating and is shown stopped a minute later.
    """
    now = now or utcnow()
    rows = session.exec(
        select(WorkerHeartbeat).order_by(WorkerHeartbeat.last_beat.desc())
    ).all()
    records = [
        {
            "worker": row.worker_id,
            "host": row.hostname,
            "pid": row.pid,
            "started_at": row.started_at,
            "last_beat": row.last_beat,
            "alive": now - row.last_beat <= timedelta(seconds=ALIVE_SECONDS)
            and not (row.last_pass or {}).get("stopped"),
            "last_pass": describe_pass(row.last_pass),
        }
        for row in rows
    ]
    columns = ["worker", "host", "pid", "started_at", "last_beat", "alive", "last_pass"]
    return pd.DataFrame.from_records(records, columns=columns)


def describe_pass(last_pass: dict[str, Any] | None) -> str:
    """What a worker's last pass did, in words, for the dashboard."""
    if not isinstance(last_pass, dict) or not last_pass:
        return "no pass yet"
    if last_pass.get("stopped"):
        return "stopped"
    recovered = last_pass.get("recovered") or {}
    parts = [
        f"{last_pass.get('events') or 0} record events",
        f"{last_pass.get('sent') or 0} messages sent",
    ]
    if isinstance(recovered, dict):
        if recovered.get("interrupted"):
            parts.append(f"{recovered['interrupted']} in-flight marked interrupted")
        if recovered.get("requeued"):
            parts.append(f"{recovered['requeued']} untried claims queued again")
        if recovered.get("taken_over"):
            parts.append(f"{recovered['taken_over']} stale emailings taken over")
    parts.extend(f"error in {error}" for error in last_pass.get("errors") or [])
    return ", ".join(parts)


# --- One pass --------------------------------------------------------------------


def run_pass(
    now: datetime | None = None, *, max_seconds: float | None = PASS_SECONDS
) -> dict[str, Any]:
    """One scheduler pass; returns what each step did.

    A step that fails is logged and reported; the others still run, so a
    broken sequence never stops emailings from going out.
    """
    settings = get_settings()
    worker_id = settings.worker_id
    now = now or utcnow()
    report: dict[str, Any] = {"at": now.isoformat(timespec="seconds")}

    def step(name: str, action: Any) -> None:
        try:
            report[name] = action()
        except Exception as exc:
            logger.exception("worker %s: %s failed", worker_id, name)
            report.setdefault("errors", []).append(f"{name}: {exc}")

    step("heartbeat", lambda: beat(now=now) or True)
    step(
        "events",
        lambda: engine.process_pending(get_engine(), now=now, worker_id=worker_id),
    )
    step("recovered", lambda: _recover(now, worker_id))
    step(
        "sent",
        lambda: delivery.dispatch_due(
            now=now, worker_id=worker_id, max_seconds=max_seconds
        ),
    )
    step("heartbeat", lambda: beat(now=now, last_pass=report) or True)
    if report.get("events") or report.get("sent"):
        logger.info(
            "worker %s pass: %s events, %s messages",
            worker_id,
            report.get("events"),
            report.get("sent"),
        )
    else:
        logger.debug("worker %s pass: nothing to do", worker_id)
    return report


def _recover(now: datetime, worker_id: str) -> dict[str, int]:
    with Session(get_engine()) as session:
        return delivery.recover_stale(session, now, worker_id=worker_id)


def _pass_job() -> None:
    run_pass()


# --- Life cycle ----------------------------------------------------------------------


def start_scheduler() -> BackgroundScheduler:
    """Start this process's scheduler, or return the one already running.

    Safe to call from several threads at once (five browser tabs, a lifespan
    hook and a CLI): exactly one scheduler runs per process.
    """
    global _scheduler, _started_at
    with _lock:
        if _scheduler is not None and _scheduler.running:
            return _scheduler
        settings = get_settings()
        delivery.allow_sending()
        _started_at = utcnow()
        scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": None,
            },
        )
        scheduler.add_job(
            _pass_job,
            "interval",
            seconds=settings.tick_seconds,
            id="pass",
            name="scheduler pass",
            next_run_time=datetime.now(UTC),
        )
        scheduler.add_job(
            _beat_job,
            "interval",
            seconds=HEARTBEAT_SECONDS,
            id="heartbeat",
            name="heartbeat",
        )
        scheduler.start()
        _scheduler = scheduler
        try:
            beat(last_pass={})
        except Exception:
            logger.exception("the first heartbeat failed")
        logger.info(
            "scheduler of worker %s started: a pass every %ss",
            settings.worker_id,
            settings.tick_seconds,
        )
        return scheduler


def stop_scheduler(*, wait: bool = True) -> None:
    """Stop the scheduler: sends stop after their batch, the pass finishes.

    Deliveries not yet claimed stay queued for the next start or another
    worker; none is left half-done.
    """
    global _scheduler
    with _lock:
        scheduler, _scheduler = _scheduler, None
        if scheduler is None or not scheduler.running:
            return
        delivery.request_stop()
        scheduler.shutdown(wait=wait)
        try:
            beat(last_pass={"stopped": True})
        except Exception:
            logger.exception("the last heartbeat failed")
        if wait:
            # The pass has returned, so no send is left to stop; direct calls
            # (the CLI, "Send now" in a test) must be able to send again.
            delivery.allow_sending()
    logger.info("scheduler of worker %s stopped", get_settings().worker_id)


def current_scheduler() -> BackgroundScheduler | None:
    """The running scheduler of this process, if any."""
    with _lock:
        if _scheduler is not None and _scheduler.running:
            return _scheduler
        return None
