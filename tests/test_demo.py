"""The demo data set: realistic, reserved domains only, history that adds up."""

from __future__ import annotations

from factories import NOW
from sqlalchemy import func
from sqlmodel import Session, select

from sequencer.demo import load_demo
from sequencer.enums import DeliveryStatus, EmailingStatus, TrackingKind
from sequencer.models import (
    Contact,
    Delivery,
    Emailing,
    Entity,
    Link,
    Record,
    Sender,
    Sequence,
    SequenceRun,
    TrackingEvent,
)


def count(session: Session, model: type, *conditions: object) -> int:
    query = select(func.count()).select_from(model).where(*conditions)
    return session.exec(query).one()


def test_demo_loads_entities_contacts_senders_and_sequences(session: Session) -> None:
    report = load_demo(session, now=NOW)

    assert report.loaded
    names = set(session.exec(select(Entity.name).where(Entity.system.is_(False))))
    assert names == {"clients", "produits", "commandes"}
    assert count(session, Record) == 60 + 40 + 150
    assert count(session, Contact) == 200
    domains = {email.rsplit("@", 1)[1] for email in session.exec(select(Contact.email))}
    assert domains <= {"example.com", "example.org", "example.net"}
    assert count(session, Sender) == 2
    assert count(session, Sequence) >= 3
    assert count(session, SequenceRun) >= 2  # the live changes show in the run log


def test_demo_history_has_deliveries_links_and_events(session: Session) -> None:
    load_demo(session, now=NOW)

    sent = session.exec(select(Emailing).where(Emailing.status == EmailingStatus.SENT))
    assert len(sent.all()) == 8
    assert count(session, Link) >= 8
    kinds = {
        kind: count(session, TrackingEvent, TrackingEvent.kind == kind)
        for kind in TrackingKind
    }
    assert all(kinds.values()), kinds
    machine = session.exec(
        select(TrackingEvent.machine_reason).where(TrackingEvent.machine.is_(True))
    ).all()
    assert machine and all(machine)
    times = session.exec(select(TrackingEvent.occurred_at)).all()
    assert max(times) <= NOW
    assert (NOW - min(times)).days >= 30


def test_demo_counters_match_their_rows(session: Session) -> None:
    load_demo(session, now=NOW)

    for emailing in session.exec(select(Emailing)).all():
        deliveries = session.exec(
            select(Delivery).where(Delivery.emailing_id == emailing.id)
        ).all()
        events = session.exec(
            select(TrackingEvent).where(TrackingEvent.emailing_id == emailing.id)
        ).all()

        def reached(*kinds: TrackingKind, people: bool = False, rows=events) -> int:
            return len(
                {
                    e.delivery_id
                    for e in rows
                    if e.kind in kinds and not (people and e.machine)
                }
            )

        assert emailing.total == len(deliveries)
        assert emailing.sent == sum(d.status is DeliveryStatus.SENT for d in deliveries)
        assert emailing.open == reached(
            TrackingKind.OPEN, TrackingKind.CLICK, people=True
        )
        assert emailing.click == reached(TrackingKind.CLICK, people=True)
        assert emailing.unsubscribe == reached(TrackingKind.UNSUBSCRIBE)
        assert emailing.bounce == reached(TrackingKind.BOUNCE)
        assert emailing.bounce == sum(
            d.status is DeliveryStatus.BOUNCED for d in deliveries
        )


def test_demo_loads_once(session: Session) -> None:
    load_demo(session, now=NOW)
    contacts = count(session, Contact)

    report = load_demo(session, now=NOW)

    assert not report.loaded and count(session, Contact) == contacts
    assert "the demo was not loaded on top of it" in str(report)
