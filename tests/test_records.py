"""Records of every entity: typed writes, their events, and validation."""

from __future__ import annotations

from datetime import UTC, datetime

import factories
import pytest
from factories import NOW
from sqlmodel import Session, select

from sequencer.enums import EventStatus, RecordAction
from sequencer.exceptions import NotFoundError, ValidationError
from sequencer.models import (
    ContactListMember,
    ContactTag,
    Emailing,
    Event,
    Record,
    Sender,
)
from sequencer.records import (
    create_record,
    delete_record,
    get_record,
    list_records,
    update_record,
)


def events(session: Session) -> list[Event]:
    return list(session.exec(select(Event).order_by(Event.id)))


def test_create_commits_the_record_with_its_event(session: Session) -> None:
    factories.products(session)

    result = create_record(session, "produits", {"name": "Café", "quantite": "12,5"})

    session.rollback()
    (event,) = events(session)
    assert result.created and result.event_id == event.id
    assert event.action is RecordAction.CREATE
    assert event.new["quantite"] == 12.5
    assert event.status is EventStatus.PROCESSED  # no sequence listens
    assert get_record(session, "produits", result.record["id"])["quantite"] == 12.5


def test_update_event_carries_old_and_new_values(session: Session) -> None:
    factories.products(session)
    record = factories.product(session)

    result = update_record(
        session, "produits", record["id"], {"quantite": "9"}, now=NOW
    )

    event = session.get(Event, result.event_id)
    assert event.old["quantite"] == 120 and event.new["quantite"] == 9
    assert event.changed == ["quantite"]
    assert result.record["updated_at"] == NOW


def test_update_that_changes_nothing_is_no_event(session: Session) -> None:
    factories.products(session)
    record = factories.product(session, quantite=120)

    result = update_record(session, "produits", record["id"], {"quantite": "120,0"})

    assert result.event_id is None
    assert result.summary() == "nothing changed"
    assert len(events(session)) == 1


def test_unknown_property_is_refused_and_nothing_written(session: Session) -> None:
    factories.products(session)

    with pytest.raises(ValidationError, match="produits: stock: no such property"):
        create_record(session, "produits", {"name": "Thé", "stock": 3})

    assert session.exec(select(Record)).all() == []
    assert events(session) == []


def test_required_property_is_refused_when_missing(session: Session) -> None:
    factories.products(session)

    with pytest.raises(ValidationError, match="produits: name: required"):
        create_record(session, "produits", {"quantite": 3})


def test_missing_record_is_not_found(session: Session) -> None:
    factories.products(session)

    with pytest.raises(NotFoundError, match="produits record 99"):
        update_record(session, "produits", 99, {"quantite": 1})


def test_list_records_searches_any_value(session: Session) -> None:
    factories.products(session)
    factories.product(session, name="Café")
    factories.product(session, name="Thé vert")

    frame = list_records(session, "produits", search="VERT")

    assert list(frame["name"]) == ["Thé vert"]
    assert list(frame.columns[:3]) == ["id", "name", "sku"]


def test_delete_removes_the_record(session: Session) -> None:
    factories.products(session)
    record = factories.product(session)

    delete_record(session, "produits", record["id"])

    with pytest.raises(NotFoundError):
        get_record(session, "produits", record["id"])


def test_contact_email_is_unique_case_insensitively(session: Session) -> None:
    create_record(session, "contact", {"email": "Jean@Example.com", "name": "Jean"})

    with pytest.raises(ValidationError, match="'jean@example.com' belongs to contact"):
        create_record(session, "contact", {"email": "JEAN@example.com"})


def test_contact_keeps_tags_lists_and_attributes(session: Session) -> None:
    first, second = (
        factories.contact_list(session, "A"),
        factories.contact_list(session, "B"),
    )

    result = create_record(
        session,
        "contact",
        {"email": "a@example.org", "tags": "vip, bio", "lists": f"[{first}, {second}]",
         "ville": "Lyon"},
    )  # fmt: skip

    contact = get_record(session, "contact", result.record["id"])
    assert contact["tags"] == ["vip", "bio"] and contact["lists"] == [first, second]
    assert contact["ville"] == "Lyon" and contact["status"] == "subscribed"
    assert len(session.exec(select(ContactTag)).all()) == 2
    update_record(session, "contact", contact["id"], {"lists": [second], "tags": []})
    assert [m.list_id for m in session.exec(select(ContactListMember))] == [second]
    assert session.exec(select(ContactTag)).all() == []


def test_contact_with_unknown_list_is_refused(session: Session) -> None:
    with pytest.raises(
        ValidationError, match="contact: lists: no contact list with id 42"
    ):
        create_record(session, "contact", {"email": "a@example.org", "lists": [42]})


def emailing_values(sender_id: int, list_id: int, **values: object) -> dict:
    base = {
        "subject": "Bonjour",
        "message": "Texte",
        "sender": sender_id,
        "contact_list": f"[{list_id}]",
        "send_at": "03/12/2026 10:00",
    }
    return {**base, **values}


def test_emailing_defaults_come_from_its_sender(session: Session) -> None:
    sender_id, list_id = factories.sender(session), factories.contact_list(session)

    result = create_record(session, "emailing", emailing_values(sender_id, list_id))

    emailing = session.get(Emailing, result.record["id"])
    assert (emailing.sender_name, emailing.sender_email) == (
        "Boutique",
        "shop@example.com",
    )
    assert emailing.reply_to == "help@example.com"
    assert emailing.status.value == "pending"
    assert emailing.send_at == datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    assert emailing.contact_lists == [list_id]


@pytest.mark.parametrize(
    ("changes", "error"),
    [({"subject": ""}, "emailing: subject: required"),
     ({"message": None}, "emailing: message: required"),
     ({"sender": 999}, "emailing: sender: no such sender"),
     ({"contact_list": "[1, 77]"}, "no contact list with id 77"),
     ({"sender_email": "not-an-address"}, "sender_email: value 'not-an-address'"),
     ({"send_at": None}, "send_at: required"),
     ({"open": 5}, "emailing: open: maintained by the system"),
     ({"status": "sent"}, "'sent' is set by the system")],
)  # fmt: skip
def test_emailing_is_validated(session: Session, changes: dict, error: str) -> None:
    sender_id, list_id = factories.sender(session), factories.contact_list(session)

    with pytest.raises(ValidationError, match=error):
        create_record(
            session, "emailing", emailing_values(sender_id, list_id, **changes)
        )


def test_emailing_saved_as_draft_needs_no_date(session: Session) -> None:
    sender_id, list_id = factories.sender(session), factories.contact_list(session)
    values = emailing_values(sender_id, list_id, send_at=None, status="draft")

    result = create_record(session, "emailing", values)

    assert result.record["status"] == "draft" and result.record["send_at"] is None


def test_sent_emailing_can_no_longer_change(session: Session) -> None:
    sender_id, list_id = factories.sender(session), factories.contact_list(session)
    record = create_record(
        session, "emailing", emailing_values(sender_id, list_id)
    ).record
    emailing = session.get(Emailing, record["id"])
    emailing.status = "sent"
    session.add(emailing)
    session.commit()

    with pytest.raises(ValidationError, match="it is sent and can no longer change"):
        update_record(session, "emailing", record["id"], {"subject": "Autre"})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"quantite": "12_5"}, "produits: quantite: value '12_5' is not a number"),
        ({"livraison": "2026-02-01 +3x"}, "produits: livraison: value .* not a date"),
        ({"livraison": "31/12/9999 +1d"}, "produits: livraison: value .* out of range"),
    ],
)
def test_create_with_misread_value_is_refused_and_stores_nothing(
    session: Session, values: dict, message: str
) -> None:
    factories.products(session)

    with pytest.raises(ValidationError, match=message):
        create_record(session, "produits", {"name": "Café", **values})

    assert session.exec(select(Record)).all() == []
    assert events(session) == []


def test_update_with_empty_status_keeps_a_contact_unsubscribed(
    session: Session,
) -> None:
    values = {"email": "u@example.com", "status": "unsubscribed"}
    contact_id = create_record(session, "contact", values).record["id"]

    result = update_record(session, "contact", contact_id, {"status": None})

    assert result.record["status"] == "unsubscribed"
    assert get_record(session, "contact", contact_id)["status"] == "unsubscribed"


def test_create_sender_with_an_address_already_used_is_refused(
    session: Session,
) -> None:
    first = factories.sender(session, "shop@example.com")

    with pytest.raises(
        ValidationError, match=f"sender: email: 'shop@example.com' belongs to sender "
        f"{first}"
    ):  # fmt: skip
        create_record(session, "sender", {"name": "Autre", "email": "SHOP@example.com"})

    assert len(session.exec(select(Sender)).all()) == 1


def test_create_emailing_with_a_subject_too_long_names_the_field(
    session: Session,
) -> None:
    sender_id = factories.sender(session)
    values = {"subject": "x" * 999, "message": "m", "sender": sender_id,
              "send_at": "now"}  # fmt: skip

    with pytest.raises(
        ValidationError, match=r"emailing: subject: at most 998 characters \(999"
    ):
        create_record(session, "emailing", values)

    assert session.exec(select(Emailing)).all() == []


def test_reference_longer_than_its_column_is_refused_not_cut(
    session: Session,
) -> None:
    factories.products(session)
    long = "r" * 256

    with pytest.raises(ValidationError, match="produits: reference: at most 255"):
        create_record(session, "produits", {"name": "Café", "reference": long})
    record = create_record(session, "produits", {"name": "Café"}).record
    with pytest.raises(ValidationError, match=r"produits \d+: reference: at most"):
        update_record(session, "produits", record["id"], {"reference": long})

    assert [r.reference for r in session.exec(select(Record))] == [None]
