"""Rows for the delivery tests: a sender, contacts in lists, a due emailing.

Contacts are written with one multi-row insert, so tests and benchmarks can
build thousands of them quickly; they go straight into the tables, as the
contact API would leave them (lower-cased address, tags mirrored).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlmodel import Session

from sequencer.enums import ContactStatus, EmailingStatus
from sequencer.models import (
    Contact,
    ContactList,
    ContactListMember,
    ContactTag,
    Emailing,
    Sender,
)

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
"""The fixed "now" of the delivery tests."""


def add_sender(session: Session, **values: Any) -> Sender:
    sender = Sender(
        name=values.pop("name", "Boutique Été"),
        email=values.pop("email", "news@shop.example.com"),
        reply_to=values.pop("reply_to", "help@shop.example.com"),
        **values,
    )
    session.add(sender)
    session.commit()
    return sender


def add_list(session: Session, name: str = "Clients") -> ContactList:
    contact_list = ContactList(name=name)
    session.add(contact_list)
    session.commit()
    return contact_list


def add_contacts(
    engine: Engine,
    addresses: Iterable[str],
    *,
    list_id: int | None = None,
    tags: list[str] | None = None,
    status: ContactStatus = ContactStatus.SUBSCRIBED,
    chunk: int = 5000,
) -> list[int]:
    """Insert contacts (and their list membership and tags); return their ids."""
    addresses = list(addresses)
    ids: list[int] = []
    for start in range(0, len(addresses), chunk):
        part = addresses[start : start + chunk]
        rows = [
            {
                "email": address,
                "name": f"Person {address.split('@')[0]}",
                "attributes": {"city": "Lyon"},
                "tags": tags or [],
                "status": status,
                "created_at": NOW,
                "updated_at": NOW,
            }
            for address in part
        ]
        with engine.begin() as connection:
            connection.execute(insert(Contact), rows)
            found = dict(
                connection.execute(
                    select(Contact.email, Contact.id).where(Contact.email.in_(part))
                ).all()
            )
            part_ids = [found[address] for address in part]
            if list_id is not None:
                connection.execute(
                    insert(ContactListMember),
                    [{"list_id": list_id, "contact_id": cid} for cid in part_ids],
                )
            if tags:
                connection.execute(
                    insert(ContactTag),
                    [
                        {"contact_id": cid, "tag": tag}
                        for cid in part_ids
                        for tag in tags
                    ],
                )
        ids.extend(part_ids)
    return ids


def addresses(count: int, *, prefix: str = "person", start: int = 0) -> list[str]:
    return [f"{prefix}{number}@example.com" for number in range(start, start + count)]


def add_emailing(
    session: Session,
    sender: Sender,
    *,
    lists: list[int] | None = None,
    send_at: datetime = NOW,
    **values: Any,
) -> Emailing:
    """A pending emailing due at ``send_at``, as the core API would create it."""
    emailing = Emailing(
        subject=values.pop("subject", "Hello {contact.name}"),
        message=values.pop("message", "Dear {contact.name},\n\nOur news.\n"),
        html=values.pop(
            "html",
            '<html><body><p>Dear {contact.name},</p><p><a href="https://shop.example.com/'
            'sale?a=1&amp;b=2">Sale</a></p><p><a href="{unsubscribe_url}">'
            "Unsubscribe</a></p></body></html>",
        ),
        sender_id=sender.id,
        sender_name=values.pop("sender_name", sender.name),
        sender_email=values.pop("sender_email", sender.email),
        reply_to=values.pop("reply_to", sender.reply_to),
        contact_lists=lists or [],
        send_at=send_at,
        status=values.pop("status", EmailingStatus.PENDING),
        **values,
    )
    session.add(emailing)
    session.commit()
    return emailing
