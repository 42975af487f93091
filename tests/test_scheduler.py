"""The scheduler: one per process, passes that do every step, a heartbeat."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from delivery_factories import (
    NOW,
    add_contacts,
    add_emailing,
    add_list,
    add_sender,
    addresses,
)
from smtp_server import SMTPSink
from sqlalchemy import Engine, select
from sqlmodel import Session
from worker_process import wait_until

from sequencer import config, records, scheduler
from sequencer.entities import get_entity
from sequencer.enums import EmailingStatus, EventStatus, RecordAction
from sequencer.models import Emailing, Event, Sender, WorkerHeartbeat
from sequencer.timeutil import utcnow


@pytest.fixture
def worker(
    engine: Engine, smtp_server: SMTPSink, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SMTPSink]:
    monkeypatch.setenv("SEQUENCER_SMTP_URL", smtp_server.url)
    monkeypatch.setenv("SEQUENCER_WORKER_ID", "worker-1")
    config.get_settings.cache_clear()
    yield smtp_server
    scheduler.stop_scheduler()


def test_pass_runs_pending_events_and_sends_due_emailings(
    engine: Engine, session: Session, worker: SMTPSink
) -> None:
    contact_list = add_list(session)
    add_contacts(
        engine, ["ann@example.com", "bob@example.com"], list_id=contact_list.id
    )
    emailing = add_emailing(session, add_sender(session), lists=[contact_list.id])
    # A record write whose sequences have not run yet (the outbox).
    written = records.create_record(
        session, "contact", {"email": "cy@example.com", "name": "Cy"}, now=NOW
    )
    session.add(
        Event(
            entity_id=get_entity(session, "contact").id,
            record_id=written.record["id"],
            action=RecordAction.UPDATE,
            changed=["name"],
            status=EventStatus.PENDING,
        )
    )
    session.commit()

    report = scheduler.run_pass(NOW)

    assert report["events"] == 1
    assert report["sent"] == 2
    assert "errors" not in report
    session.expire_all()
    assert session.get_one(Emailing, emailing.id).status == EmailingStatus.SENT
    statuses = session.scalars(select(Event.status)).all()
    assert set(statuses) == {EventStatus.PROCESSED}
    assert worker.total() == 2


def _slow_emailing(
    engine: Engine,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    send_at: datetime = NOW,
    **settings: str,
) -> Emailing:
    """An emailing to 60 addresses, sent at 40 a second: a pass of 1.5 s."""
    for name, value in {"SMTP_RATE": "40", **settings}.items():
        monkeypatch.setenv(f"SEQUENCER_{name}", value)
    config.get_settings.cache_clear()
    contact_list = add_list(session)
    add_contacts(engine, addresses(60), list_id=contact_list.id)
    return add_emailing(
        session, add_sender(session), lists=[contact_list.id], send_at=send_at
    )


def test_pass_cut_short_leaves_the_rest_to_the_next_pass(
    engine: Engine,
    session: Session,
    worker: SMTPSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emailing = _slow_emailing(engine, session, monkeypatch, BATCH_SIZE="5")

    first = scheduler.run_pass(NOW, max_seconds=0.5)
    session.expire_all()
    assert 0 < first["sent"] < 60
    assert session.get_one(Emailing, emailing.id).status == EmailingStatus.SENDING

    second = scheduler.run_pass(NOW + timedelta(seconds=3), max_seconds=None)

    assert first["sent"] + second["sent"] == 60
    assert worker.counts() == dict.fromkeys(addresses(60), 1)
    session.expire_all()
    assert session.get_one(Emailing, emailing.id).status == EmailingStatus.SENT


def test_emailing_due_during_a_long_pass_goes_out_on_a_later_one(
    engine: Engine,
    session: Session,
    worker: SMTPSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_one = _slow_emailing(
        engine, session, monkeypatch, TICK_SECONDS="0.2", send_at=utcnow()
    )

    # The real scheduler: its passes come every 0.2 s, the first lasts 1.5 s.
    scheduler.start_scheduler()
    assert wait_until(lambda: worker.total() > 0, timeout=30)
    late_one = add_emailing(
        session,
        session.get_one(Sender, long_one.sender_id),
        lists=long_one.contact_lists,
        send_at=utcnow(),
    )

    def sent(emailing_id: int) -> bool:
        with Session(engine) as check:
            stored = check.get_one(Emailing, emailing_id)
            return stored.status == EmailingStatus.SENT

    assert wait_until(lambda: sent(long_one.id) and sent(late_one.id), timeout=60)
    assert worker.counts() == dict.fromkeys(addresses(60), 2)


def test_pass_writes_the_heartbeat_with_what_it_did(
    engine: Engine, session: Session, worker: SMTPSink
) -> None:
    scheduler.run_pass(NOW)

    beat = session.get_one(WorkerHeartbeat, "worker-1")
    assert beat.last_beat == NOW
    assert beat.last_pass["sent"] == 0
    assert beat.last_pass["events"] == 0


def test_worker_status_tells_alive_from_stopped(
    engine: Engine, session: Session, worker: SMTPSink
) -> None:
    scheduler.beat(now=NOW)

    alive = scheduler.worker_status(session, now=NOW + timedelta(seconds=5))
    stopped = scheduler.worker_status(session, now=NOW + timedelta(minutes=5))

    assert list(alive["worker"]) == ["worker-1"]
    assert list(alive["alive"]) == [True]
    assert list(stopped["alive"]) == [False]


def test_worker_stopped_cleanly_is_shown_stopped_at_once(
    engine: Engine, session: Session, worker: SMTPSink
) -> None:
    scheduler.start_scheduler()
    running = scheduler.worker_status(session)
    scheduler.stop_scheduler()
    session.expire_all()

    stopped = scheduler.worker_status(session)

    assert list(running["alive"]) == [True]
    assert list(stopped["alive"]) == [False]
    assert list(stopped["last_pass"]) == ["stopped"]


def test_last_pass_is_described_in_words(
    engine: Engine, session: Session, worker: SMTPSink
) -> None:
    scheduler.beat(
        now=NOW,
        last_pass={
            "events": 3,
            "sent": 120,
            "recovered": {"interrupted": 2, "taken_over": 0},
            "errors": ["events: boom"],
        },
    )

    (described,) = scheduler.worker_status(session, now=NOW)["last_pass"]

    assert described == (
        "3 record events, 120 messages sent, 2 in-flight marked interrupted, "
        "error in events: boom"
    )


def test_starting_from_many_threads_makes_one_scheduler(
    engine: Engine, worker: SMTPSink
) -> None:
    started: list[BackgroundScheduler] = []
    barrier = threading.Barrier(5)

    def start() -> None:
        barrier.wait()
        started.append(scheduler.start_scheduler())

    threads = [threading.Thread(target=start) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({id(item) for item in started}) == 1
    assert scheduler.current_scheduler() is started[0]
    jobs = {job.id: job for job in started[0].get_jobs()}
    assert jobs["pass"].max_instances == 1
    assert jobs["pass"].coalesce is True


def test_stop_scheduler_stops_it_and_a_new_start_makes_another(
    engine: Engine, worker: SMTPSink
) -> None:
    first = scheduler.start_scheduler()
    scheduler.stop_scheduler()

    assert not first.running
    assert scheduler.current_scheduler() is None
    second = scheduler.start_scheduler()
    assert second is not first and second.running
