"""Unsubscribes, bounces, and rebuilding an emailing's counters from events.

What the counters of an Emailing mean:

- ``open``: recipients who opened, people only; a click counts as an open
  when no open was seen (images blocked).
- ``click``: recipients who clicked, people only.
- ``unsubscribe``: recipients who unsubscribed through this emailing.
- ``bounce``: recipients whose address was refused permanently.
- ``open_any``, ``click_any``: as ``open`` and ``click``, machines included.

Machine opens and clicks (see ``machines``) are kept in the events, in the
``*_any`` counters and the ``first_*_any_at`` times of deliveries, and
reported apart by ``stats``.
Every counter can be rebuilt from the append-only events with
``recompute_counters``.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlmodel import Session

from sequencer.enums import ContactStatus, DeliveryStatus, TrackingKind
from sequencer.ingest import add_to_rollup, client_hash
from sequencer.models import (
    Contact,
    Delivery,
    Emailing,
    Link,
    TrackingEvent,
    TrackingHour,
)
from sequencer.stats import hour_bucket
from sequencer.timeutil import utcnow

logger = logging.getLogger(__name__)


def unsubscribe(
    session: Session,
    delivery_id: int,
    *,
    user_agent: str = "",
    address: str | None = None,
    now: datetime | None = None,
) -> bool | None:
    """Unsubscribe the recipient of a delivery, at once.

    Returns True when this call unsubscribed them, False when they already
    were, None when the delivery does not exist. The contact is excluded from
    every later send; the emailing's ``unsubscribe`` counter moves once.
    Runs in the caller's transaction.
    """
    now = now or utcnow()

    # The conditional update decides, atomically, which request is first.
    first = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.unsubscribed_at.is_(None))
        .values(unsubscribed_at=now, updated_at=now)
    ).rowcount
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        return None
    if delivery.contact_id is not None:
        session.execute(
            update(Contact)
            .where(
                Contact.id == delivery.contact_id,
                Contact.status != ContactStatus.UNSUBSCRIBED,
            )
            .values(
                status=ContactStatus.UNSUBSCRIBED, unsubscribed_at=now, updated_at=now
            )
        )
    if not first:
        return False

    session.add(
        TrackingEvent(
            kind=TrackingKind.UNSUBSCRIBE,
            emailing_id=delivery.emailing_id,
            delivery_id=delivery.id,
            contact_id=delivery.contact_id,
            occurred_at=now,
            user_agent=user_agent[:512],
            client_hash=client_hash(address),
        )
    )
    session.execute(
        update(Emailing)
        .where(Emailing.id == delivery.emailing_id)
        .values(unsubscribe=Emailing.unsubscribe + 1)
    )
    logger.info(
        "delivery %s of emailing %s: contact %s unsubscribed",
        delivery.id,
        delivery.emailing_id,
        delivery.contact_id,
    )
    return True


def record_bounce(
    session: Session, delivery: Delivery, reply: str, *, now: datetime | None = None
) -> bool:
    """Mark a delivery bounced after a permanent (5xx) refusal.

    Sets the delivery bounced with the server's reply, marks the contact
    bounced so no later emailing goes to it, appends a bounce event and
    moves the emailing's ``bounce`` counter, in the caller's transaction.
    Returns False, changing nothing, if the delivery had already bounced.
    """
    now = now or utcnow()
    first = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery.id, Delivery.bounced_at.is_(None))
        .values(
            status=DeliveryStatus.BOUNCED,
            bounced_at=now,
            smtp_reply=reply[:2000],
            updated_at=now,
        )
    ).rowcount
    if not first:
        return False
    session.refresh(delivery)

    if delivery.contact_id is not None:
        session.execute(
            update(Contact)
            .where(
                Contact.id == delivery.contact_id,
                Contact.status == ContactStatus.SUBSCRIBED,
            )
            .values(status=ContactStatus.BOUNCED, bounced_at=now, updated_at=now)
        )
    session.add(
        TrackingEvent(
            kind=TrackingKind.BOUNCE,
            emailing_id=delivery.emailing_id,
            delivery_id=delivery.id,
            contact_id=delivery.contact_id,
            occurred_at=now,
        )
    )
    session.execute(
        update(Emailing)
        .where(Emailing.id == delivery.emailing_id)
        .values(bounce=Emailing.bounce + 1)
    )
    logger.info(
        "delivery %s of emailing %s bounced: %s",
        delivery.id,
        delivery.emailing_id,
        reply[:200],
    )
    return True


def _first(kind: TrackingKind, *, people_only: bool) -> Any:
    """The first event of a kind for the delivery of the enclosing UPDATE."""
    event = TrackingEvent
    conditions = [event.delivery_id == Delivery.id, event.kind == kind]
    if people_only:
        conditions.append(event.machine.is_(False))
    return select(func.min(event.occurred_at)).where(*conditions).scalar_subquery()


def recompute_counters(session: Session, emailing_id: int) -> dict[str, int]:
    """Rebuild an emailing's counters, first-activity times, rollup and link clicks.

    Derived from the events alone, so the numbers survive the deletion of a
    contact and any drift. Runs in the caller's transaction; returns the new
    ``open``, ``click``, ``unsubscribe``, ``bounce``, ``open_any`` and
    ``click_any``.
    """
    event = TrackingEvent

    # Each delivery's first open and click, by people and by anyone.
    session.execute(
        update(Delivery)
        .where(Delivery.emailing_id == emailing_id)
        .values(
            first_open_at=_first(TrackingKind.OPEN, people_only=True),
            first_click_at=_first(TrackingKind.CLICK, people_only=True),
            first_open_any_at=_first(TrackingKind.OPEN, people_only=False),
            first_click_any_at=_first(TrackingKind.CLICK, people_only=False),
        )
    )

    # The hourly rollup, grouped by hour in the database.
    session.execute(delete(TrackingHour).where(TrackingHour.emailing_id == emailing_id))
    hour = hour_bucket(event.occurred_at, session)
    statement = (
        select(hour, event.kind, event.machine, func.count(event.id))
        .where(
            event.emailing_id == emailing_id,
            event.kind.in_([TrackingKind.OPEN, TrackingKind.CLICK]),
        )
        .group_by(hour, event.kind, event.machine)
        .order_by(hour, event.kind, event.machine)
    )
    hours = [
        {"emailing_id": emailing_id, "hour": h, "kind": k, "machine": m, "events": n}
        for h, k, m, n in session.execute(statement)
    ]
    if hours:
        add_to_rollup(session, hours)

    # The counters: distinct recipients per kind.
    def recipients(*conditions: Any) -> int:
        statement = select(func.count(func.distinct(event.delivery_id))).where(
            event.emailing_id == emailing_id, *conditions
        )
        return session.execute(statement).scalar_one()

    people = event.machine.is_(False)
    opens_or_clicks = event.kind.in_([TrackingKind.OPEN, TrackingKind.CLICK])
    counters = {
        "open": recipients(people, opens_or_clicks),
        "click": recipients(people, event.kind == TrackingKind.CLICK),
        "unsubscribe": recipients(event.kind == TrackingKind.UNSUBSCRIBE),
        "bounce": recipients(event.kind == TrackingKind.BOUNCE),
        "open_any": recipients(opens_or_clicks),
        "click_any": recipients(event.kind == TrackingKind.CLICK),
    }

    # Each link's clicks, by people and by machines.
    def clicks(machine: bool) -> Any:
        return (
            select(func.count(event.id))
            .where(
                event.link_id == Link.id,
                event.kind == TrackingKind.CLICK,
                event.machine.is_(machine),
            )
            .scalar_subquery()
        )

    session.execute(
        update(Link)
        .where(Link.emailing_id == emailing_id)
        .values(clicks=clicks(False), machine_clicks=clicks(True))
    )
    session.execute(
        update(Emailing).where(Emailing.id == emailing_id).values(**counters)
    )
    logger.info("emailing %s: counters recomputed: %s", emailing_id, counters)
    return counters
