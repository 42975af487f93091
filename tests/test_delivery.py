"""Sending through a real SMTP server: once each, failures, cancel, tests."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from delivery_factories import (
    NOW,
    add_contacts,
    add_emailing,
    add_list,
    add_sender,
    addresses,
)
from smtp_server import SMTPSink, free_port
from sqlalchemy import Engine, func, select, text, update
from sqlmodel import Session

from sequencer import claims, config, delivery, tokens
from sequencer.enums import ContactStatus, DeliveryStatus, EmailingStatus, TrackingKind
from sequencer.exceptions import SendError, ValidationError
from sequencer.models import Contact, Delivery, Emailing, TrackingEvent
from sequencer.types import parse_value

S = DeliveryStatus


@pytest.fixture
def smtp(smtp_server: SMTPSink, monkeypatch: pytest.MonkeyPatch) -> SMTPSink:
    """The test SMTP server, configured as the one Sequencer sends through."""
    monkeypatch.setenv("SEQUENCER_SMTP_URL", smtp_server.url)
    monkeypatch.setenv("SEQUENCER_SMTP_CONNECTIONS", "2")
    monkeypatch.setenv("SEQUENCER_BATCH_SIZE", "10")
    monkeypatch.setenv("SEQUENCER_MAX_ATTEMPTS", "3")
    config.get_settings.cache_clear()
    return smtp_server


@pytest.fixture
def impatient(smtp: SMTPSink, monkeypatch: pytest.MonkeyPatch) -> SMTPSink:
    """The test server, with Sequencer waiting one second for each answer.

    The server's stalls (``stall_rcpt``, ``stall_data``) last longer.
    """
    monkeypatch.setenv("SEQUENCER_SMTP_TIMEOUT", "1")
    config.get_settings.cache_clear()
    smtp.handler.stall_seconds = 2.5
    return smtp


def _emailing_to(
    engine: Engine, session: Session, count: int, **values: object
) -> Emailing:
    sender = add_sender(session)
    contact_list = add_list(session)
    add_contacts(engine, addresses(count), list_id=contact_list.id)
    return add_emailing(session, sender, lists=[contact_list.id], **values)


def _stored(session: Session, emailing_id: int) -> Emailing:
    session.expire_all()
    return session.get_one(Emailing, emailing_id)


def _delivery_to(session: Session, address: str) -> Delivery:
    session.expire_all()
    return session.scalars(select(Delivery).where(Delivery.email == address)).one()


def _statuses(session: Session, emailing_id: int) -> Counter[DeliveryStatus]:
    rows = session.scalars(
        select(Delivery.status).where(Delivery.emailing_id == emailing_id)
    ).all()
    return Counter(rows)


def _assert_counters_match_rows(session: Session, emailing_id: int) -> None:
    emailing = _stored(session, emailing_id)
    statuses = _statuses(session, emailing_id)
    assert emailing.total == sum(statuses.values())
    assert emailing.sent == statuses[S.SENT]
    assert emailing.bounce == statuses[S.BOUNCED]


def test_due_emailing_reaches_every_recipient_once(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 45)

    accepted = delivery.dispatch_due(now=NOW, worker_id="w1")

    assert accepted == 45
    assert smtp.counts() == dict.fromkeys(addresses(45), 1)
    stored = _stored(session, emailing.id)
    assert stored.status == EmailingStatus.SENT
    assert stored.note == "45 sent"
    assert stored.finished_at is not None
    _assert_counters_match_rows(session, emailing.id)


def test_each_message_names_its_own_recipient(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 3)
    delivery.dispatch_due(now=NOW, worker_id="w1")

    for address in addresses(3):
        (message,) = smtp.parsed(address)
        name = f"Person {address.split('@')[0]}"
        assert message["To"].addresses[0].addr_spec == address
        assert message["Subject"] == f"Hello {name}"
        row = session.scalars(
            select(Delivery).where(
                Delivery.emailing_id == emailing.id, Delivery.email == address
            )
        ).one()
        assert message["Message-ID"] == row.message_id
        assert tokens.unsubscribe_url(row.id) in message["List-Unsubscribe"]


def test_connections_are_reused_and_run_in_parallel(
    engine: Engine, session: Session, smtp: SMTPSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQUENCER_SMTP_CONNECTIONS", "3")
    config.get_settings.cache_clear()
    _emailing_to(engine, session, 90)

    delivery.dispatch_due(now=NOW, worker_id="w1")

    # Nine batches of ten shared by three sessions, each kept for many messages.
    assert smtp.total() == 90
    assert 2 <= len(smtp.sessions()) <= 3


def test_rate_limit_holds_over_every_connection(
    engine: Engine, session: Session, smtp: SMTPSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQUENCER_SMTP_RATE", "20")
    config.get_settings.cache_clear()
    _emailing_to(engine, session, 21)

    delivery.dispatch_due(now=NOW, worker_id="w1")

    # 21 messages at 20 a second, over two connections: a second at least,
    # where unlimited they take a few milliseconds.
    times = smtp.arrival_times()
    assert len(times) == 21
    assert times[-1] - times[0] >= 0.9


def test_emailing_not_yet_due_is_left_alone(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 2, send_at=NOW + timedelta(minutes=5))

    assert delivery.dispatch_due(now=NOW, worker_id="w1") == 0

    assert smtp.total() == 0
    assert _stored(session, emailing.id).status == EmailingStatus.PENDING


def test_draft_is_never_sent(engine: Engine, session: Session, smtp: SMTPSink) -> None:
    emailing = _emailing_to(engine, session, 2, status=EmailingStatus.DRAFT)

    delivery.dispatch_due(now=NOW + timedelta(days=1), worker_id="w1")

    assert smtp.total() == 0
    assert _stored(session, emailing.id).status == EmailingStatus.DRAFT


@pytest.mark.parametrize(
    ("local", "utc_hour"),
    [("2026-01-15 10:00", 9), ("2026-07-15 10:00", 8)],
    ids=["winter", "summer"],
)
def test_paris_ten_oclock_goes_out_at_the_right_utc_hour(
    engine: Engine, session: Session, smtp: SMTPSink, local: str, utc_hour: int
) -> None:
    send_at = parse_value(
        "datetime", local, subject="emailing", field="send_at", timezone="Europe/Paris"
    )
    assert send_at.astimezone(ZoneInfo("Europe/Paris")).hour == 10
    emailing = _emailing_to(engine, session, 1, send_at=send_at)
    day = send_at.astimezone(UTC).date()
    due = datetime(day.year, day.month, day.day, utc_hour, tzinfo=UTC)

    delivery.dispatch_due(now=due - timedelta(seconds=1), worker_id="w1")
    assert smtp.total() == 0
    delivery.dispatch_due(now=due, worker_id="w1")

    assert smtp.total() == 1
    assert _stored(session, emailing.id).send_at == due


def test_550_bounces_that_recipient_and_the_others_get_it(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    smtp.bounce.add("person2@example.com")
    emailing = _emailing_to(engine, session, 5)

    delivery.dispatch_due(now=NOW, worker_id="w1")

    assert set(smtp.counts()) == set(addresses(5)) - {"person2@example.com"}
    bounced = _delivery_to(session, "person2@example.com")
    assert bounced.status == S.BOUNCED
    assert bounced.smtp_reply.startswith("550")
    contact = session.scalars(
        select(Contact).where(Contact.email == "person2@example.com")
    ).one()
    assert contact.status == ContactStatus.BOUNCED
    events = session.scalars(
        select(TrackingEvent.kind).where(TrackingEvent.delivery_id == bounced.id)
    ).all()
    assert events == [TrackingKind.BOUNCE]
    stored = _stored(session, emailing.id)
    assert (stored.status, stored.sent, stored.bounce) == (EmailingStatus.SENT, 4, 1)
    _assert_counters_match_rows(session, emailing.id)
    state = delivery.sending_state(session, emailing.id)
    assert state["deliveries"] == {"sent": 4, "bounced": 1}
    assert (state["note"], state["total"], state["bounce"]) == (
        "4 sent, 1 bounced",
        5,
        1,
    )


def test_451_is_retried_with_backoff_then_sent(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    smtp.defer.add("person0@example.com")
    emailing = _emailing_to(engine, session, 3)

    delivery.dispatch_due(now=NOW, worker_id="w1")
    waiting = _delivery_to(session, "person0@example.com")
    assert waiting.status == S.QUEUED
    assert waiting.attempts == 1
    assert waiting.smtp_reply.startswith("451")
    # The pass's clock moves on while it sends: the wait starts at the reply.
    retry_at = waiting.next_attempt_at
    assert retry_at is not None
    assert NOW + claims.RETRY_BASE <= retry_at < NOW + 2 * claims.RETRY_BASE
    assert _stored(session, emailing.id).status == EmailingStatus.SENDING

    # Before the retry time nothing happens; after it the server accepts.
    delivery.dispatch_due(now=NOW + timedelta(seconds=30), worker_id="w1")
    assert "person0@example.com" not in smtp.counts()
    smtp.defer.clear()
    delivery.dispatch_due(now=NOW + timedelta(minutes=2), worker_id="w1")

    assert smtp.counts()["person0@example.com"] == 1
    stored = _stored(session, emailing.id)
    assert (stored.status, stored.sent) == (EmailingStatus.SENT, 3)


def test_451_until_the_limit_fails_the_delivery_keeping_the_reply(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    smtp.defer.add("person1@example.com")
    emailing = _emailing_to(engine, session, 2)

    now = NOW
    for _attempt in range(3):
        delivery.dispatch_due(now=now, worker_id="w1")
        now += timedelta(hours=2)

    failed = _delivery_to(session, "person1@example.com")
    assert failed.status == S.FAILED
    assert failed.attempts == 3
    assert "greylisted" in failed.smtp_reply
    stored = _stored(session, emailing.id)
    assert stored.status == EmailingStatus.SENT
    assert stored.note == "1 sent, 1 failed"
    _assert_counters_match_rows(session, emailing.id)


def test_421_for_one_recipient_costs_the_next_nothing(
    engine: Engine, session: Session, smtp: SMTPSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQUENCER_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("SEQUENCER_SMTP_CONNECTIONS", "1")
    config.get_settings.cache_clear()
    smtp.handler.reply_once["person0@example.com"] = "421 4.3.2 Shutting down"
    emailing = _emailing_to(engine, session, 3)

    delivery.dispatch_due(now=NOW, worker_id="w1")

    # The server closed the session on its 421: the others are not charged.
    assert set(smtp.counts()) == {"person1@example.com", "person2@example.com"}
    rows = session.scalars(
        select(Delivery).where(Delivery.emailing_id == emailing.id)
    ).all()
    replies = {row.email: (row.status, row.smtp_reply) for row in rows}
    assert replies["person0@example.com"] == (S.FAILED, "421 4.3.2 Shutting down")
    _assert_counters_match_rows(session, emailing.id)


def test_timeout_before_the_message_is_handed_over_retries_it_once(
    engine: Engine, session: Session, impatient: SMTPSink
) -> None:
    smtp = impatient
    smtp.handler.stall_rcpt.add("person1@example.com")
    emailing = _emailing_to(engine, session, 4)

    delivery.dispatch_due(now=NOW, worker_id="w1")
    waiting = _delivery_to(session, "person1@example.com")
    assert (waiting.status, waiting.attempts) == (S.QUEUED, 1)
    assert waiting.smtp_reply == "no answer in 1s"
    assert set(smtp.counts()) == set(addresses(4)) - {"person1@example.com"}

    delivery.dispatch_due(now=NOW + timedelta(minutes=2), worker_id="w1")

    assert smtp.counts() == dict.fromkeys(addresses(4), 1)
    stored = _stored(session, emailing.id)
    assert (stored.status, stored.sent) == (EmailingStatus.SENT, 4)
    _assert_counters_match_rows(session, emailing.id)


def test_silence_after_the_message_is_handed_over_is_never_resent(
    engine: Engine, session: Session, impatient: SMTPSink
) -> None:
    smtp = impatient
    smtp.handler.stall_data.add("person2@example.com")
    emailing = _emailing_to(engine, session, 4)

    # The server stored the message, then said nothing until the timeout.
    delivery.dispatch_due(now=NOW, worker_id="w1")
    for later in (timedelta(minutes=2), timedelta(hours=3)):
        delivery.dispatch_due(now=NOW + later, worker_id="w1")

    assert smtp.counts() == dict.fromkeys(addresses(4), 1)
    silent = _delivery_to(session, "person2@example.com")
    assert silent.status == S.INTERRUPTED
    assert silent.attempts == 1
    assert silent.smtp_reply.startswith(
        "the message was handed over, then no answer in 1s; not resent"
    )
    assert "not resent" in silent.smtp_reply
    stored = _stored(session, emailing.id)
    assert stored.status == EmailingStatus.SENT
    assert stored.note == "3 sent, 1 interrupted"
    _assert_counters_match_rows(session, emailing.id)


def test_server_down_keeps_the_emailing_sending_then_resumes(
    engine: Engine, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("SEQUENCER_SMTP_URL", f"smtp://127.0.0.1:{port}")
    config.get_settings.cache_clear()
    emailing = _emailing_to(engine, session, 12)

    assert delivery.dispatch_due(now=NOW, worker_id="w1") == 0

    stored = _stored(session, emailing.id)
    assert stored.status == EmailingStatus.SENDING
    assert _statuses(session, emailing.id) == Counter({S.QUEUED: 12})
    attempts = session.scalars(select(func.max(Delivery.attempts))).one()
    assert attempts == 0

    with SMTPSink(port=port) as sink:
        later = NOW + claims.SERVER_DOWN_WAIT + timedelta(seconds=5)
        delivery.dispatch_due(now=later, worker_id="w1")
        assert sink.counts() == dict.fromkeys(addresses(12), 1)
    assert _stored(session, emailing.id).status == EmailingStatus.SENT


def test_unreachable_server_is_left_alone_until_it_may_be_back(
    engine: Engine, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("SEQUENCER_SMTP_URL", f"smtp://127.0.0.1:{port}")
    monkeypatch.setenv("SEQUENCER_SMTP_CONNECTIONS", "2")
    monkeypatch.setenv("SEQUENCER_BATCH_SIZE", "10")
    config.get_settings.cache_clear()
    emailing = _emailing_to(engine, session, 60)

    def waiting() -> int:
        session.expire_all()
        return session.scalars(
            select(func.count()).where(Delivery.next_attempt_at.is_not(None))
        ).one()

    delivery.dispatch_due(now=NOW, worker_id="w1")
    handed_back = waiting()
    assert 0 < handed_back <= 20

    # The next passes do not claim batch after batch only to hand them back.
    for seconds in (2, 4, 20):
        delivery.dispatch_due(now=NOW + timedelta(seconds=seconds), worker_id="w1")
    assert waiting() == handed_back
    assert _statuses(session, emailing.id) == {S.QUEUED: 60}

    with SMTPSink(port=port) as sink:
        later = NOW + claims.SERVER_DOWN_WAIT + timedelta(seconds=5)
        delivery.dispatch_due(now=later, worker_id="w1")
        assert sink.counts() == dict.fromkeys(addresses(60), 1)
    _assert_counters_match_rows(session, emailing.id)


def test_message_refused_fails_without_bouncing_the_addresses(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 5)
    smtp.handler.refuse_message = "554 5.7.1 Message refused as spam"

    delivery.dispatch_due(now=NOW, worker_id="w1")

    assert _statuses(session, emailing.id) == {S.FAILED: 5}
    _assert_counters_match_rows(session, emailing.id)
    rows = session.scalars(
        select(Delivery).where(Delivery.emailing_id == emailing.id)
    ).all()
    assert {row.attempts for row in rows} == {1}
    assert {row.smtp_reply for row in rows} == {"554 5.7.1 Message refused as spam"}
    statuses = session.scalars(select(Contact.status)).all()
    assert set(statuses) == {ContactStatus.SUBSCRIBED}


def test_database_connections_cut_mid_send_lose_nothing(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    """The database drops every connection (a restart, a failover) mid-batch.

    Send loops keep their connection between transactions; the one that
    finds it dead reconnects and commits what the server already accepted.
    """
    if engine.dialect.name != "postgresql":
        pytest.skip("only a PostgreSQL server can drop its clients' connections")
    emailing = _emailing_to(engine, session, 60)
    session.close()

    def drop_connections(received: int) -> None:
        if received == 15:
            with engine.connect() as connection:
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()"
                    )
                )

    smtp.handler.after_message = drop_connections
    accepted = delivery.dispatch_due(now=NOW, worker_id="w1")

    assert accepted == 60
    assert smtp.total() == 60
    assert _statuses(session, emailing.id) == {S.SENT: 60}
    _assert_counters_match_rows(session, emailing.id)


def test_cancel_stops_between_batches_with_exact_counters(
    engine: Engine, session: Session, smtp: SMTPSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQUENCER_SMTP_CONNECTIONS", "1")
    config.get_settings.cache_clear()
    emailing = _emailing_to(engine, session, 50)

    def cancel_midway(received: int) -> None:
        if received == 15:
            with Session(engine) as other:
                delivery.cancel_emailing(other, emailing.id, now=NOW)

    smtp.handler.after_message = cancel_midway
    delivery.dispatch_due(now=NOW, worker_id="w1")

    # The batch in flight (messages 11 to 20) finishes; the rest is skipped.
    assert smtp.total() == 20
    stored = _stored(session, emailing.id)
    assert stored.status == EmailingStatus.CANCELLED
    assert stored.sent == 20
    assert _statuses(session, emailing.id) == Counter({S.SENT: 20, S.SKIPPED: 30})
    assert stored.note == "Cancelled: 30 recipients skipped."
    _assert_counters_match_rows(session, emailing.id)


def test_cancel_skips_a_delivery_that_fails_after_it(
    engine: Engine, session: Session, smtp: SMTPSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQUENCER_SMTP_CONNECTIONS", "1")
    config.get_settings.cache_clear()
    # The first batch, in address order: person0, person10, ..., person18.
    smtp.defer.add("person12@example.com")
    emailing = _emailing_to(engine, session, 20)

    def cancel_midway(received: int) -> None:
        if received == 3:
            with Session(engine) as other:
                delivery.cancel_emailing(other, emailing.id, now=NOW)

    smtp.handler.after_message = cancel_midway
    delivery.dispatch_due(now=NOW, worker_id="w1")
    delivery.dispatch_due(now=NOW + timedelta(hours=2), worker_id="w1")

    # The first batch finishes; its 451 is not queued for a retry nobody makes.
    assert smtp.total() == 9
    assert "person12@example.com" not in smtp.counts()
    assert _statuses(session, emailing.id) == Counter({S.SENT: 9, S.SKIPPED: 11})
    stored = _stored(session, emailing.id)
    assert stored.note == "Cancelled: 11 recipients skipped."
    _assert_counters_match_rows(session, emailing.id)


def test_pass_clean_up_skips_what_came_back_to_a_cancelled_queue(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 3)
    assert claims.claim_emailing(engine, emailing.id, worker_id="w1", now=NOW)
    in_flight = claims.claim_batch(engine, emailing.id, worker_id="w1", now=NOW, size=1)
    delivery.cancel_emailing(session, emailing.id, now=NOW)
    # Handed back by a sender that saw the cancel only after its commit.
    session.execute(
        update(Delivery)
        .where(Delivery.id == in_flight[0].id)
        .values(status=S.QUEUED, claimed_by=None)
    )
    session.commit()

    delivery.recover_stale(session, NOW + timedelta(seconds=5), worker_id="w1")

    assert _statuses(session, emailing.id) == Counter({S.SKIPPED: 3})
    assert _stored(session, emailing.id).note == "Cancelled: 3 recipients skipped."


def test_cancel_of_a_sent_emailing_is_refused(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 1)
    delivery.dispatch_due(now=NOW, worker_id="w1")

    with pytest.raises(ValidationError, match="it is sent; only a draft"):
        delivery.cancel_emailing(session, emailing.id)


def test_send_now_schedules_a_draft(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 2, status=EmailingStatus.DRAFT)

    scheduled = delivery.send_now(session, emailing.id, now=NOW)
    delivery.dispatch_due(now=NOW, worker_id="w1")

    assert scheduled.status == EmailingStatus.PENDING
    assert smtp.total() == 2


def test_send_test_sends_one_marked_message_and_counts_nothing(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 3)

    result = delivery.send_test(session, emailing.id, "Boss@Example.com", now=NOW)

    assert "Boss@Example.com" in result
    assert smtp.counts() == {"boss@example.com": 1}
    (message,) = smtp.parsed("boss@example.com")
    assert message["X-Sequencer-Test"] == "yes"
    assert message["Subject"].startswith("[Test] ")
    stored = _stored(session, emailing.id)
    assert (stored.status, stored.total, stored.sent) == (EmailingStatus.PENDING, 0, 0)
    assert session.scalars(select(func.count()).select_from(Delivery)).one() == 0
    open_token = tokens.open_url_for_test(emailing.id)
    html = message.get_body(("html",))
    assert html is not None and open_token in html.get_content()


def test_send_test_without_an_address_asks_for_one(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 1)

    with pytest.raises(ValidationError, match="address: give the address to send"):
        delivery.send_test(session, emailing.id, "  ")
    assert smtp.total() == 0


def test_send_test_refused_by_the_server_says_why(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    smtp.bounce.add("nobody@example.com")
    emailing = _emailing_to(engine, session, 1)

    with pytest.raises(SendError, match="refused: 550"):
        delivery.send_test(session, emailing.id, "nobody@example.com")


@pytest.mark.parametrize("address", ["a@b@example.com", "a@example.com, c@x.io"])
def test_send_test_to_what_is_not_one_address_is_refused(
    engine: Engine, session: Session, smtp: SMTPSink, address: str
) -> None:
    emailing = _emailing_to(engine, session, 1)

    with pytest.raises(SendError, match="message not built: address .* is not valid"):
        delivery.send_test(session, emailing.id, address)
    assert smtp.total() == 0


def test_stale_in_flight_deliveries_are_interrupted_never_resent(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 25)
    assert claims.claim_emailing(engine, emailing.id, worker_id="dead", now=NOW)
    in_flight = claims.claim_batch(
        engine, emailing.id, worker_id="dead", now=NOW, size=5
    )

    # Not stale yet: the other deliveries go, the claimed five wait.
    delivery.dispatch_due(now=NOW + timedelta(seconds=10), worker_id="w2")
    assert smtp.total() == 20
    assert _stored(session, emailing.id).status == EmailingStatus.SENDING

    later = NOW + timedelta(hours=1)
    recovered = delivery.recover_stale(session, later, worker_id="w2")
    delivery.dispatch_due(now=later, worker_id="w2")

    assert recovered == {"interrupted": 5, "requeued": 0, "taken_over": 1}
    assert smtp.total() == 20
    for row in in_flight:
        assert row.email not in smtp.counts()
    stored = _stored(session, emailing.id)
    assert stored.status == EmailingStatus.SENT
    assert stored.note == "20 sent, 5 interrupted"
    _assert_counters_match_rows(session, emailing.id)


def test_dead_workers_untried_claims_go_back_to_the_queue(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 40)
    assert claims.claim_emailing(engine, emailing.id, worker_id="dead", now=NOW)
    batch = claims.claim_batch(
        engine, emailing.id, worker_id="dead", now=NOW, size=30, window=10
    )
    assert _statuses(session, emailing.id) == {
        S.SENDING: 10,
        S.CLAIMED: 20,
        S.QUEUED: 10,
    }

    later = NOW + timedelta(hours=1)
    recovered = delivery.recover_stale(session, later, worker_id="w2")
    delivery.dispatch_due(now=later, worker_id="w2")

    # Only its open window may have gone out: the other 30 get one message each.
    assert recovered == {"interrupted": 10, "requeued": 20, "taken_over": 1}
    window = {row.email for row in batch[:10]}
    assert smtp.counts() == dict.fromkeys(set(addresses(40)) - window, 1)
    stored = _stored(session, emailing.id)
    assert stored.note == "30 sent, 10 interrupted"
    assert {row.attempts for row in session.scalars(select(Delivery))} == {1}
    _assert_counters_match_rows(session, emailing.id)


def test_slow_worker_marked_interrupted_still_records_its_send(
    engine: Engine, session: Session
) -> None:
    emailing = _emailing_to(engine, session, 1)
    claims.claim_emailing(engine, emailing.id, worker_id="slow", now=NOW)
    (row,) = claims.claim_batch(engine, emailing.id, worker_id="slow", now=NOW, size=5)
    delivery.recover_stale(session, NOW + timedelta(hours=1), worker_id="other")

    claims.record_sent(
        engine,
        emailing.id,
        [row.id],
        worker_id="slow",
        now=NOW,
        reply="250 ok",
        message_id=("<e.d", "@x>"),
    )

    assert _statuses(session, emailing.id) == Counter({S.SENT: 1})
    _assert_counters_match_rows(session, emailing.id)


def test_two_workers_at_once_send_each_recipient_once(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 300)
    errors: list[BaseException] = []

    def work(worker_id: str) -> None:
        try:
            delivery.dispatch_due(now=NOW, worker_id=worker_id)
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert smtp.counts() == dict.fromkeys(addresses(300), 1)
    _assert_counters_match_rows(session, emailing.id)
    assert _stored(session, emailing.id).status == EmailingStatus.SENT


def test_outbox_backend_writes_one_eml_per_recipient(
    engine: Engine, session: Session, tmp_path: Path
) -> None:
    emailing = _emailing_to(engine, session, 4)

    assert delivery.dispatch_due(now=NOW, worker_id="w1") == 4

    files = sorted((tmp_path / "outbox").glob("*.eml"))
    assert len(files) == 4
    assert not list((tmp_path / "outbox").glob(".*.part"))
    recipients = {
        line.split("<")[-1].rstrip(">")
        for path in files
        for line in path.read_text().splitlines()
        if line.startswith("To: ")
    }
    assert recipients == set(addresses(4))
    stored = _stored(session, emailing.id)
    assert (stored.status, stored.sent) == (EmailingStatus.SENT, 4)
    row = session.scalars(select(Delivery)).first()
    assert row is not None and row.smtp_reply.startswith("written to ")


def test_emailing_without_sender_address_fails_with_a_note(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    emailing = _emailing_to(engine, session, 2)
    session.execute(
        update(Emailing).where(Emailing.id == emailing.id).values(sender_email="")
    )
    session.commit()

    delivery.dispatch_due(now=NOW, worker_id="w1")

    stored = _stored(session, emailing.id)
    assert stored.status == EmailingStatus.FAILED
    assert "no sender address" in stored.note
    assert smtp.total() == 0


def test_header_injection_through_a_contact_name_reaches_no_one(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    sender = add_sender(session)
    contact_list = add_list(session)
    (contact_id,) = add_contacts(engine, ["eve@example.com"], list_id=contact_list.id)
    session.execute(
        update(Contact)
        .where(Contact.id == contact_id)
        .values(name="Eve\r\nBcc: victim@example.com")
    )
    session.commit()
    add_emailing(session, sender, lists=[contact_list.id])

    delivery.dispatch_due(now=NOW, worker_id="w1")

    assert smtp.counts() == {"eve@example.com": 1}
    (message,) = smtp.parsed("eve@example.com")
    assert message["Bcc"] is None
    assert message["Subject"] == "Hello Eve Bcc: victim@example.com"


def test_non_ascii_round_trips_through_smtp(
    engine: Engine, session: Session, smtp: SMTPSink
) -> None:
    sender = add_sender(session, name="Café Crème")
    contact_list = add_list(session)
    (contact_id,) = add_contacts(engine, ["zoe@example.com"], list_id=contact_list.id)
    session.execute(
        update(Contact).where(Contact.id == contact_id).values(name="Zoé Żółć")
    )
    session.commit()
    add_emailing(
        session,
        sender,
        lists=[contact_list.id],
        subject="Été — {contact.name} ☀",
        message="Chère {contact.name}, à bientôt ✓",
    )

    delivery.dispatch_due(now=NOW, worker_id="w1")

    (message,) = smtp.parsed("zoe@example.com")
    assert message["Subject"] == "Été — Zoé Żółć ☀"
    assert message["From"].addresses[0].display_name == "Café Crème"
    assert message["To"].addresses[0].display_name == "Zoé Żółć"
    text = message.get_body(("plain",))
    assert text is not None
    assert text.get_content().strip() == "Chère Zoé Żółć, à bientôt ✓"
    raw = smtp.received("zoe@example.com")[0]
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_due_count_counts_pending_emailings_whose_time_has_come(
    engine: Engine, session: Session
) -> None:
    sender = add_sender(session)
    add_emailing(session, sender, send_at=NOW - timedelta(minutes=1))
    add_emailing(session, sender, send_at=NOW + timedelta(minutes=1))
    add_emailing(session, sender, send_at=NOW, status=EmailingStatus.DRAFT)

    assert delivery.due_count(session, now=NOW) == 1


def test_claimed_batch_carries_the_contacts_names_and_attributes(
    engine: Engine, session: Session
) -> None:
    emailing = _emailing_to(engine, session, 3)
    claims.claim_emailing(engine, emailing.id, worker_id="w1", now=NOW)

    batch = claims.claim_batch(engine, emailing.id, worker_id="w1", now=NOW, size=2)

    assert [row.attempts for row in batch] == [1, 1]
    assert batch[0].id < batch[1].id
    for row in batch:
        assert row.name == f"Person {row.email.split('@')[0]}"
        assert row.attributes == {"city": "Lyon"}
