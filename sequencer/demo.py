"""The demo data set: a small French fine-food shop with a history.

Everything comes from ``data/demo/``: the configuration (entities Clients,
Produits, Commandes, two senders, four contact lists, four sequences), CSV
files of records and about 200 contacts (addresses only in the reserved
example.com/.org/.net domains), and the past emailings. Their recipients,
deliveries, opens, clicks, unsubscribes and bounces are generated from the
rates in ``emailings.json`` with a fixed seed, dated relative to ``now``, so
the statistics have weeks of history on first run. Counters are then rebuilt
from those rows, so they agree with them exactly.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from sequencer import records
from sequencer.config import DATA_DIR
from sequencer.config_io import import_config
from sequencer.csv_import import import_csv
from sequencer.enums import ContactStatus, DeliveryStatus, EmailingStatus, TrackingKind
from sequencer.models import (
    Contact,
    ContactList,
    ContactListMember,
    ContactTag,
    Delivery,
    Emailing,
    Entity,
    Link,
    Sender,
    Sequence,
    TrackingEvent,
)
from sequencer.timeutil import as_utc, utcnow

logger = logging.getLogger(__name__)

DEMO_DIR = DATA_DIR / "demo"
HUMAN_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like "
    "Gecko) Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Microsoft Outlook 16.0.18025; Windows NT 10.0",
]
APPLE_PROXY_AGENT = "Mozilla/5.0"
SCANNER_AGENT = "Mozilla/5.0 (compatible; Barracuda Sentinel link protection)"


@dataclass
class DemoReport:
    """What the demo load wrote."""

    loaded: bool
    lines: list[str]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def demo_present(session: Session) -> bool:
    """True once the demo (or any real data) is in the database."""
    has_products = session.scalars(select(Entity.id).where(Entity.name == "produits"))
    has_contacts = session.scalar(select(func.count()).select_from(Contact))
    return has_products.first() is not None or bool(has_contacts)


def load_demo(
    session: Session, *, now: datetime | None = None, folder: Path = DEMO_DIR
) -> DemoReport:
    """Load the demo data set; does nothing when it (or other data) is present."""
    now = as_utc(now) if now else utcnow()
    if demo_present(session):
        return DemoReport(
            False,
            [
                "the database already holds data (a produits entity or contacts):"
                " the demo was not loaded on top of it"
            ],
        )
    lines = []
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))

    # Records first, with no sequence defined yet: history fires nothing.
    without_sequences = {**config, "sequences": []}
    import_config(session, without_sequences)
    for entity, name, key in (
        ("clients", "clients.csv", "email"),
        ("produits", "produits.csv", "sku"),
        ("commandes", "commandes.csv", "numero"),
    ):
        report = import_csv(session, entity, folder / name, key=key, now=now)
        lines.append(f"{entity}: {report.summary()}")
    report = import_csv(session, "contact", _contacts_file(session, folder), now=now)
    lines.append(f"contacts: {report.summary()}")
    import_config(session, config)
    lines.append(f"sequences: {len(config['sequences'])}")

    # The past emailings, with every delivery and tracking event.
    history = json.loads((folder / "emailings.json").read_text(encoding="utf-8"))
    emailings = _History(session, now).load(history)
    session.commit()
    lines.append(f"emailings: {emailings}")

    # A few live changes, so the run log shows sequences at work.
    lines += _live_changes(session, now)
    logger.info("demo data loaded")
    return DemoReport(True, lines)


def _contacts_file(session: Session, folder: Path) -> bytes:
    """The contacts CSV with list names turned into this database's list ids."""
    ids = {item.name: item.id for item in session.scalars(select(ContactList))}
    text = (folder / "contacts.csv").read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    output = io.StringIO()
    names = [name for name in reader.fieldnames or [] if name != "listes"]
    writer = csv.DictWriter(output, fieldnames=[*names, "lists"], lineterminator="\n")
    writer.writeheader()
    for row in reader:
        lists = [ids[name] for name in row.pop("listes").split("|") if name]
        writer.writerow({**row, "lists": json.dumps(lists)})
    return output.getvalue().encode("utf-8")


def _live_changes(session: Session, now: datetime) -> list[str]:
    lines = []
    produits = records.list_records(session, "produits")
    plenty = produits[produits["quantite"] >= 10].sort_values("id")
    if not plenty.empty:
        product = plenty.iloc[0]
        result = records.update_record(
            session, "produits", int(product["id"]), {"quantite": 6}, now=now
        )
        lines.append(f"{product['nom']}: quantite 6: {result.summary()}")
    commandes = records.list_records(session, "commandes")
    shipped = commandes[commandes["statut"] == "expédiée"].sort_values("id")
    if not shipped.empty:
        order = shipped.iloc[0]
        result = records.update_record(
            session, "commandes", int(order["id"]), {"statut": "livrée"}, now=now
        )
        lines.append(f"{order['numero']} livrée: {result.summary()}")
    return lines


class _History:
    """Builds past emailings with deliveries and tracking events."""

    def __init__(self, session: Session, now: datetime) -> None:
        self.session = session
        self.now = now
        self.lists = {
            item.name: item.id for item in session.scalars(select(ContactList))
        }
        self.senders = {item.email: item for item in session.scalars(select(Sender))}
        self.sequences = {
            item.name: item.id for item in session.scalars(select(Sequence))
        }
        self.gone: set[int] = set()
        """Contacts that unsubscribed or bounced: later emailings skip them."""

    def load(self, history: dict[str, Any]) -> int:
        count = 0
        past = sorted(history.get("emailings", []), key=lambda e: -e["days_ago"])
        for number, spec in enumerate(past):
            self._past(spec, random.Random(1000 + number))
            count += 1
        for spec in history.get("upcoming", []):
            send_at = self._day(-spec["days_ahead"], spec["hour"])
            self._emailing(spec, EmailingStatus.PENDING, send_at)
            count += 1
        for spec in history.get("drafts", []):
            self._emailing(spec, EmailingStatus.DRAFT, None)
            count += 1
        return count

    def _day(self, days_ago: int, hour: int) -> datetime:
        moment = self.now - timedelta(days=days_ago)
        return moment.replace(hour=hour, minute=0, second=0, microsecond=0)

    def _emailing(
        self, spec: dict[str, Any], status: EmailingStatus, send_at: datetime | None
    ) -> Emailing:
        sender = self.senders[spec["sender"]]
        links = spec.get("links", [])
        paragraphs = "".join(
            f'<p><a href="{url}">{_link_text(url)}</a></p>' for url in links
        )
        html = (
            "<p>Bonjour {contact.name},</p>"
            f"<p>{spec['subject']}</p>{paragraphs}"
            '<p><a href="{unsubscribe_url}">Se désinscrire</a></p>'
        )
        created = (send_at or self.now) - timedelta(days=2)
        emailing = Emailing(
            subject=spec["subject"],
            message="",
            html=html,
            sender_id=sender.id,
            sender_name=sender.name,
            sender_email=sender.email,
            reply_to=sender.reply_to,
            contact_lists=[self.lists[name] for name in spec["lists"]],
            tag_filter=list(spec.get("tag_filter", [])),
            send_at=send_at,
            status=status,
            reference=self._product_reference(spec.get("product")),
            sequence_id=self.sequences.get(spec.get("sequence", "")),
            created_at=min(created, self.now),
            updated_at=min(created, self.now),
        )
        self.session.add(emailing)
        self.session.flush()
        return emailing

    def _product_reference(self, sku: str | None) -> str | None:
        """``produits/<id>`` of the product with this reference (sku)."""
        if not sku:
            return None
        produits = records.list_records(self.session, "produits")
        match = produits[produits["sku"] == sku]
        return f"produits/{int(match.iloc[0]['id'])}" if not match.empty else None

    def _recipients(self, emailing: Emailing) -> list[Contact]:
        members = select(ContactListMember.contact_id).where(
            ContactListMember.list_id.in_(emailing.contact_lists)
        )
        query = select(Contact).where(Contact.id.in_(members)).order_by(Contact.id)
        if emailing.tag_filter:
            tagged = select(ContactTag.contact_id).where(
                ContactTag.tag.in_(emailing.tag_filter)
            )
            query = query.where(Contact.id.in_(tagged))
        return [
            contact
            for contact in self.session.scalars(query)
            if contact.id not in self.gone
        ]

    def _past(self, spec: dict[str, Any], rng: random.Random) -> None:
        sent = self._day(spec["days_ago"], spec["hour"])
        emailing = self._emailing(spec, EmailingStatus.SENT, sent)
        links = [self._link(emailing.id, url) for url in spec.get("links", [])]
        rates = spec["rates"]
        deliveries = []
        events: list[TrackingEvent] = []
        for position, contact in enumerate(self._recipients(emailing)):
            at = sent + timedelta(seconds=2 * position)
            delivery = Delivery(
                emailing_id=emailing.id,
                contact_id=contact.id,
                email=contact.email,
                attempts=1,
                message_id=f"<demo.{emailing.id}.{contact.id}@example.com>",
                sent_at=at,
                created_at=sent,
                updated_at=at,
            )
            deliveries.append((delivery, contact))
            self.session.add(delivery)
        self.session.flush()

        for delivery, contact in deliveries:
            events += self._activity(emailing, delivery, contact, links, rates, rng)
        self.session.add_all(events)
        emailing.total = len(deliveries)
        emailing.sent = sum(d.status is DeliveryStatus.SENT for d, _ in deliveries)
        emailing.recipients_resolved = True
        emailing.started_at = sent
        emailing.finished_at = sent + timedelta(seconds=2 * len(deliveries) + 5)
        self.session.add(emailing)
        self.session.flush()
        _recompute(self.session, emailing.id)

    def _link(self, emailing_id: int, url: str) -> int:
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
        link = Link(emailing_id=emailing_id, url=url, url_hash=digest)
        self.session.add(link)
        self.session.flush()
        return link.id

    def _activity(
        self,
        emailing: Emailing,
        delivery: Delivery,
        contact: Contact,
        links: list[int],
        rates: dict[str, float],
        rng: random.Random,
    ) -> list[TrackingEvent]:
        """One recipient's story: bounce, or opens, clicks, maybe unsubscribe."""
        from sequencer.machines import APPLE_PRIVACY, TOO_SOON

        sent = delivery.sent_at
        if rng.random() < rates["bounce"]:
            delivery.status = DeliveryStatus.BOUNCED
            delivery.smtp_reply = f"550 5.1.1 <{contact.email}>: user unknown"
            delivery.bounced_at = sent
            delivery.sent_at = None
            contact.status, contact.bounced_at = ContactStatus.BOUNCED, sent
            self.gone.add(contact.id)
            return [self._event(TrackingKind.BOUNCE, delivery, sent, rng)]
        delivery.status = DeliveryStatus.SENT
        delivery.smtp_reply = "250 2.0.0 Ok: queued"
        events = []
        if rng.random() < 0.12:
            # Apple Mail Privacy Protection fetches the pixel minutes after delivery.
            moment = sent + timedelta(minutes=rng.uniform(1, 12))
            events.append(
                self._event(
                    TrackingKind.OPEN,
                    delivery,
                    moment,
                    rng,
                    APPLE_PROXY_AGENT,
                    APPLE_PRIVACY,
                )
            )
        if links and rng.random() < 0.03:
            moment = sent + timedelta(seconds=rng.uniform(1, 6))
            events.append(
                self._event(
                    TrackingKind.CLICK,
                    delivery,
                    moment,
                    rng,
                    SCANNER_AGENT,
                    TOO_SOON,
                    link_id=rng.choice(links),
                )
            )
        if rng.random() >= rates["open"]:
            return events
        agent = rng.choice(HUMAN_AGENTS)
        opened = sent + timedelta(minutes=rng.lognormvariate(4.2, 1.3))
        events.append(self._event(TrackingKind.OPEN, delivery, opened, rng, agent))
        if rng.random() < 0.25:
            again = opened + timedelta(hours=rng.uniform(1, 72))
            events.append(self._event(TrackingKind.OPEN, delivery, again, rng, agent))
        if links and rng.random() < rates["click"] / rates["open"]:
            for _ in range(rng.choice([1, 1, 1, 2])):
                clicked = opened + timedelta(seconds=rng.uniform(20, 600))
                events.append(
                    self._event(
                        TrackingKind.CLICK,
                        delivery,
                        clicked,
                        rng,
                        agent,
                        link_id=rng.choice(links),
                    )
                )
        if rng.random() < rates["unsubscribe"] / rates["open"]:
            left = opened + timedelta(minutes=rng.uniform(1, 30))
            events.append(
                self._event(TrackingKind.UNSUBSCRIBE, delivery, left, rng, agent)
            )
            delivery.unsubscribed_at = min(left, self.now)
            contact.status = ContactStatus.UNSUBSCRIBED
            contact.unsubscribed_at = min(left, self.now)
            self.gone.add(contact.id)
        return [event for event in events if event.occurred_at <= self.now]

    def _event(
        self,
        kind: TrackingKind,
        delivery: Delivery,
        moment: datetime,
        rng: random.Random,
        agent: str = "",
        machine_reason: str = "",
        link_id: int | None = None,
    ) -> TrackingEvent:
        return TrackingEvent(
            kind=kind,
            emailing_id=delivery.emailing_id,
            delivery_id=delivery.id,
            contact_id=delivery.contact_id,
            link_id=link_id,
            occurred_at=moment,
            user_agent=agent,
            client_hash=f"{rng.getrandbits(64):016x}" if agent else "",
            machine=bool(machine_reason),
            machine_reason=machine_reason,
        )


def _link_text(url: str) -> str:
    path = url.split("://", 1)[-1].split("?", 1)[0].rstrip("/")
    last = path.rsplit("/", 1)[-1].replace("-", " ")
    return last.capitalize() if "/" in path else "Visiter la boutique"


def _recompute(session: Session, emailing_id: int) -> None:
    """Counters, first-activity times and hourly rollups from the events."""
    from sequencer.counters import recompute_counters

    recompute_counters(session, emailing_id)
