"""Who an emailing goes to, resolved in SQL into one delivery row per address.

The recipients are the union of the emailing's contact lists (or every
contact), kept when they carry any of the tag filter's tags, minus contacts
that unsubscribed or bounced, one per address compared case-insensitively.
They are written with a single ``INSERT ... SELECT``: a list of 100,000
contacts never passes through Python.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import Select, exists, func, literal, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session

from sequencer.db import insert_for
from sequencer.enums import ContactStatus, DeliveryStatus
from sequencer.models import Contact, ContactListMember, ContactTag, Delivery, Emailing
from sequencer.timeutil import UTCDateTime

logger = logging.getLogger(__name__)


def recipients_query(emailing: Emailing) -> Select[tuple[int, str]]:
    """``(contact id, address)`` of every recipient, one row per address.

    When two contacts share an address in different cases (which the contact
    API prevents, but imported data may not), the older contact receives it.
    """
    address = func.lower(Contact.email)
    conditions: list[ColumnElement[bool]] = [Contact.status == ContactStatus.SUBSCRIBED]
    if not emailing.all_contacts:
        list_ids = [int(list_id) for list_id in emailing.contact_lists]
        conditions.append(
            exists().where(
                ContactListMember.contact_id == Contact.id,
                ContactListMember.list_id.in_(list_ids),
            )
        )
    tags = [str(tag).strip() for tag in emailing.tag_filter if str(tag).strip()]
    if tags:
        conditions.append(
            exists().where(
                ContactTag.contact_id == Contact.id, ContactTag.tag.in_(tags)
            )
        )
    return select(func.min(Contact.id), address).where(*conditions).group_by(address)


def resolve_recipients(session: Session, emailing: Emailing, *, now: datetime) -> int:
    """Create the queued delivery rows of an emailing and set its ``total``.

    Runs in the caller's transaction, which is the one that claimed the
    emailing: the rows, ``total`` and ``recipients_resolved`` become visible
    together or not at all. Idempotent: contacts that already have a delivery
    row for this emailing are not added again. (The outer ``WHERE`` is there
    for SQLite, which would read ``ON CONFLICT`` after a bare ``SELECT`` as a
    join.)
    """
    found = recipients_query(emailing).subquery()
    rows = select(
        literal(emailing.id),
        found.c[0],
        found.c[1],
        literal(DeliveryStatus.QUEUED.value),
        literal(0),
        literal(""),
        literal(now, UTCDateTime),
        literal(now, UTCDateTime),
    ).where(found.c[0].is_not(None))
    columns = [
        "emailing_id",
        "contact_id",
        "email",
        "status",
        "attempts",
        "smtp_reply",
        "created_at",
        "updated_at",
    ]
    # Conflicts rather than NOT EXISTS: the planner, without statistics on a
    # young delivery table, checked each new row against every row inserted
    # before it.
    session.execute(
        insert_for(session, Delivery)
        .from_select(columns, rows)
        .on_conflict_do_nothing(index_elements=["emailing_id", "contact_id"])
    )

    total = session.scalar(
        select(func.count()).where(Delivery.emailing_id == emailing.id)
    )
    emailing.total = int(total or 0)
    emailing.recipients_resolved = True
    emailing.updated_at = now
    session.add(emailing)
    session.flush()
    logger.info("emailing %s: %s recipients resolved", emailing.id, emailing.total)
    return emailing.total
