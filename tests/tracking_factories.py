"""Rows for the tracking and statistics tests: an emailing sent to contacts.

Kept apart from the core factories because these tests need deliveries that
look sent (``sent_at`` set, status sent) without going through SMTP.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from sequencer.enums import DeliveryStatus, EmailingStatus
from sequencer.models import Contact, Delivery, Emailing, Sender


def make_sender(session: Session) -> Sender:
    sender = Sender(name="Shop", email="shop@example.com")
    session.add(sender)
    session.flush()
    return sender


def make_sent_emailing(
    session: Session,
    *,
    recipients: int,
    sent_at: datetime,
    subject: str = "Winter sale",
    sequence_id: int | None = None,
    sender: Sender | None = None,
    first_contact: int = 0,
) -> tuple[Emailing, list[Delivery]]:
    """An emailing sent at ``sent_at`` to ``recipients`` new contacts; committed."""
    sender = sender or make_sender(session)
    emailing = Emailing(
        subject=subject,
        message="Hello",
        html="<p>Hello</p>",
        sender_id=sender.id,
        sequence_id=sequence_id,
        send_at=sent_at,
        status=EmailingStatus.SENT,
        total=recipients,
        sent=recipients,
        recipients_resolved=True,
        started_at=sent_at,
        finished_at=sent_at,
    )
    session.add(emailing)
    session.flush()
    deliveries = []
    for number in range(first_contact, first_contact + recipients):
        contact = Contact(email=f"person{number}@example.com", name=f"Person {number}")
        session.add(contact)
        session.flush()
        delivery = Delivery(
            emailing_id=emailing.id,
            contact_id=contact.id,
            email=contact.email,
            status=DeliveryStatus.SENT,
            attempts=1,
            sent_at=sent_at,
        )
        session.add(delivery)
        deliveries.append(delivery)
    session.commit()
    return emailing, deliveries
