"""kill -9 in the middle of a send, then a restart: nobody gets two messages."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
from delivery_factories import (
    add_contacts,
    add_emailing,
    add_list,
    add_sender,
    addresses,
)
from smtp_server import SMTPSink
from sqlalchemy import Engine, select
from sqlmodel import Session
from worker_process import start_worker, stop, wait_until

from sequencer.delivery import WINDOW
from sequencer.enums import DeliveryStatus, EmailingStatus
from sequencer.models import Delivery, Emailing
from sequencer.timeutil import utcnow

RECIPIENTS = 600
CONNECTIONS = 2
BATCH = 100

pytestmark = pytest.mark.slow


def test_killed_worker_restarted_sends_the_rest_once_and_marks_in_flight(
    engine: Engine, session: Session, smtp_server: SMTPSink, tmp_path: Path
) -> None:
    contact_list = add_list(session)
    add_contacts(engine, addresses(RECIPIENTS), list_id=contact_list.id)
    emailing = add_emailing(
        session, add_sender(session), lists=[contact_list.id], send_at=utcnow()
    )
    settings = {
        "SMTP_URL": smtp_server.url,
        "SMTP_CONNECTIONS": str(CONNECTIONS),
        "BATCH_SIZE": str(BATCH),
        "SMTP_RATE": "150",
        "STALE_CLAIM_SECONDS": "2",
    }

    # Kill the first worker without warning while it is sending.
    first = start_worker("first", tmp_path / "first.log", **settings)
    try:
        assert wait_until(lambda: smtp_server.total() >= 150, timeout=60)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    received_before_restart = smtp_server.total()
    assert received_before_restart < RECIPIENTS

    # A new worker takes over once the dead one's claims are stale.
    second = start_worker("second", tmp_path / "second.log", **settings)
    try:

        def finished() -> bool:
            with Session(engine) as check:
                stored = check.get_one(Emailing, emailing.id)
                return stored.status == EmailingStatus.SENT

        done = wait_until(finished, timeout=120)
    finally:
        code = stop(second)
    logs = "\n".join(path.read_text() for path in tmp_path.glob("*.log"))
    assert done, logs
    assert code == 0, logs

    # Nobody got two messages; everyone not in flight at the kill got one:
    # of the batches claimed, only the windows open at the kill are in doubt.
    counts = smtp_server.counts()
    assert set(counts.values()) == {1}
    rows = session.execute(
        select(Delivery.email, Delivery.status).where(
            Delivery.emailing_id == emailing.id
        )
    ).all()
    status_of = dict(rows)
    statuses = Counter(status_of.values())
    assert set(statuses) <= {DeliveryStatus.SENT, DeliveryStatus.INTERRUPTED}
    interrupted = statuses[DeliveryStatus.INTERRUPTED]
    assert 1 <= interrupted <= CONNECTIONS * WINDOW < CONNECTIONS * BATCH
    assert set(counts) | {
        email for email, status in rows if status == DeliveryStatus.INTERRUPTED
    } == {email for email, _status in rows}
    sent = {email for email, status in rows if status == DeliveryStatus.SENT}
    assert sent <= set(counts)
    assert len(counts) - len(sent) <= interrupted
    assert len(counts) == smtp_server.total()

    session.expire_all()
    stored = session.get_one(Emailing, emailing.id)
    assert stored.total == RECIPIENTS
    assert stored.sent == len(sent) == statuses[DeliveryStatus.SENT]
    assert stored.note == f"{len(sent)} sent, {interrupted} interrupted"
