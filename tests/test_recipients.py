"""Recipients: lists, all contacts, tags, exclusions, one per address."""

from __future__ import annotations

from delivery_factories import (
    NOW,
    add_contacts,
    add_emailing,
    add_list,
    add_sender,
    addresses,
)
from sqlalchemy import Engine, select
from sqlmodel import Session

from sequencer.claims import NO_LIST_NOTE, NO_RECIPIENT_NOTE, claim_emailing
from sequencer.enums import ContactStatus, DeliveryStatus, EmailingStatus
from sequencer.models import Delivery, Emailing
from sequencer.recipients import resolve_recipients


def _addresses_of(session: Session, emailing_id: int) -> list[str]:
    return sorted(
        session.scalars(
            select(Delivery.email).where(Delivery.emailing_id == emailing_id)
        ).all()
    )


def test_recipients_are_the_union_of_the_lists(
    engine: Engine, session: Session
) -> None:
    sender = add_sender(session)
    first, second, other = (add_list(session, name) for name in ("A", "B", "C"))
    add_contacts(engine, addresses(3, prefix="a"), list_id=first.id)
    add_contacts(engine, addresses(2, prefix="b"), list_id=second.id)
    add_contacts(engine, addresses(4, prefix="c"), list_id=other.id)
    emailing = add_emailing(session, sender, lists=[first.id, second.id])

    total = resolve_recipients(session, emailing, now=NOW)
    session.commit()

    assert total == 5
    assert emailing.total == 5 and emailing.recipients_resolved
    assert _addresses_of(session, emailing.id) == sorted(
        addresses(3, prefix="a") + addresses(2, prefix="b")
    )


def test_contact_in_two_lists_gets_one_delivery(
    engine: Engine, session: Session
) -> None:
    sender = add_sender(session)
    first, second = add_list(session, "A"), add_list(session, "B")
    ids = add_contacts(engine, ["both@example.com"], list_id=first.id)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO contactlistmember (list_id, contact_id) VALUES "
            f"({second.id}, {ids[0]})"
        )
    emailing = add_emailing(session, sender, lists=[first.id, second.id])

    assert resolve_recipients(session, emailing, now=NOW) == 1


def test_all_contacts_ignores_the_lists(engine: Engine, session: Session) -> None:
    sender = add_sender(session)
    add_contacts(engine, addresses(3, prefix="listed"), list_id=add_list(session).id)
    add_contacts(engine, addresses(2, prefix="free"))
    emailing = add_emailing(session, sender, all_contacts=True)

    assert resolve_recipients(session, emailing, now=NOW) == 5


def test_tag_filter_keeps_contacts_with_any_of_the_tags(
    engine: Engine, session: Session
) -> None:
    sender = add_sender(session)
    contact_list = add_list(session)
    add_contacts(engine, ["vip@example.com"], list_id=contact_list.id, tags=["vip"])
    add_contacts(engine, ["new@example.com"], list_id=contact_list.id, tags=["new"])
    add_contacts(engine, ["plain@example.com"], list_id=contact_list.id)
    add_contacts(engine, ["other@example.com"], list_id=contact_list.id, tags=["x"])
    emailing = add_emailing(
        session, sender, lists=[contact_list.id], tag_filter=["vip", "new"]
    )

    resolve_recipients(session, emailing, now=NOW)

    assert _addresses_of(session, emailing.id) == ["new@example.com", "vip@example.com"]


def test_unsubscribed_and_bounced_contacts_are_left_out(
    engine: Engine, session: Session
) -> None:
    sender = add_sender(session)
    contact_list = add_list(session)
    add_contacts(engine, ["in@example.com"], list_id=contact_list.id)
    add_contacts(
        engine,
        ["gone@example.com"],
        list_id=contact_list.id,
        status=ContactStatus.UNSUBSCRIBED,
    )
    add_contacts(
        engine,
        ["bad@example.com"],
        list_id=contact_list.id,
        status=ContactStatus.BOUNCED,
    )
    emailing = add_emailing(session, sender, lists=[contact_list.id])

    resolve_recipients(session, emailing, now=NOW)

    assert _addresses_of(session, emailing.id) == ["in@example.com"]


def test_same_address_in_two_cases_is_sent_once(
    engine: Engine, session: Session
) -> None:
    sender = add_sender(session)
    contact_list = add_list(session)
    add_contacts(
        engine, ["Dup@Example.com", "dup@example.com"], list_id=contact_list.id
    )
    emailing = add_emailing(session, sender, lists=[contact_list.id])

    resolve_recipients(session, emailing, now=NOW)

    assert _addresses_of(session, emailing.id) == ["dup@example.com"]


def test_resolving_twice_adds_no_delivery(engine: Engine, session: Session) -> None:
    sender = add_sender(session)
    contact_list = add_list(session)
    add_contacts(engine, addresses(4), list_id=contact_list.id)
    emailing = add_emailing(session, sender, lists=[contact_list.id])

    resolve_recipients(session, emailing, now=NOW)
    total = resolve_recipients(session, emailing, now=NOW)

    assert total == 4
    assert len(_addresses_of(session, emailing.id)) == 4


def test_emailing_without_recipient_ends_sent_with_a_note(
    engine: Engine, session: Session
) -> None:
    sender = add_sender(session)
    empty = add_list(session)
    emailing = add_emailing(session, sender, lists=[empty.id])

    assert claim_emailing(engine, emailing.id, worker_id="w1", now=NOW)

    session.expire_all()
    stored = session.get_one(Emailing, emailing.id)
    assert stored.status == EmailingStatus.SENT
    assert stored.total == 0
    assert stored.note == NO_RECIPIENT_NOTE


def test_emailing_without_list_says_so(engine: Engine, session: Session) -> None:
    emailing = add_emailing(session, add_sender(session), lists=[])

    claim_emailing(engine, emailing.id, worker_id="w1", now=NOW)

    session.expire_all()
    assert session.get_one(Emailing, emailing.id).note == NO_LIST_NOTE


def test_claimed_emailing_has_queued_deliveries_and_total(
    engine: Engine, session: Session
) -> None:
    sender = add_sender(session)
    contact_list = add_list(session)
    add_contacts(engine, addresses(7), list_id=contact_list.id)
    emailing = add_emailing(session, sender, lists=[contact_list.id])

    assert claim_emailing(engine, emailing.id, worker_id="w1", now=NOW)
    assert not claim_emailing(engine, emailing.id, worker_id="w2", now=NOW)

    session.expire_all()
    stored = session.get_one(Emailing, emailing.id)
    statuses = session.scalars(
        select(Delivery.status).where(Delivery.emailing_id == emailing.id)
    ).all()
    assert stored.status == EmailingStatus.SENDING
    assert stored.claimed_by == "w1"
    assert stored.total == len(statuses) == 7
    assert set(statuses) == {DeliveryStatus.QUEUED}
