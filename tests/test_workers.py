"""Several worker processes share one emailing; nobody gets two messages."""

from __future__ import annotations

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
from sqlalchemy import Engine, func, select
from sqlmodel import Session
from worker_process import start_worker, stop, wait_until

from sequencer.enums import DeliveryStatus, EmailingStatus
from sequencer.models import Delivery, Emailing
from sequencer.timeutil import utcnow

RECIPIENTS = 2000

pytestmark = pytest.mark.slow


def test_two_worker_processes_send_each_address_exactly_once(
    engine: Engine, session: Session, smtp_server: SMTPSink, tmp_path: Path
) -> None:
    contact_list = add_list(session)
    add_contacts(engine, addresses(RECIPIENTS), list_id=contact_list.id)
    emailing = add_emailing(
        session, add_sender(session), lists=[contact_list.id], send_at=utcnow()
    )

    workers = [
        start_worker(
            name,
            tmp_path / f"{name}.log",
            SMTP_URL=smtp_server.url,
            SMTP_CONNECTIONS="2",
            BATCH_SIZE="25",
        )
        for name in ("worker-a", "worker-b")
    ]
    try:

        def finished() -> bool:
            with Session(engine) as check:
                status = check.scalars(
                    select(Emailing.status).where(Emailing.id == emailing.id)
                ).one()
            return status == EmailingStatus.SENT

        done = wait_until(finished, timeout=180)
    finally:
        codes = [stop(worker) for worker in workers]
    logs = "\n".join(path.read_text() for path in tmp_path.glob("*.log"))

    assert done, logs
    assert codes == [0, 0], logs
    counts = smtp_server.counts()
    assert len(counts) == RECIPIENTS
    assert set(counts.values()) == {1}
    assert set(counts) == set(addresses(RECIPIENTS))

    session.expire_all()
    stored = session.get_one(Emailing, emailing.id)
    assert stored.total == stored.sent == RECIPIENTS
    rows = session.execute(
        select(Delivery.claimed_by, func.count())
        .where(Delivery.status == DeliveryStatus.SENT)
        .group_by(Delivery.claimed_by)
    ).all()
    assert sum(count for _worker, count in rows) == RECIPIENTS
    assert {worker for worker, _count in rows} <= {"worker-a", "worker-b"}
