"""The system entities: Emailing, Contact, Contact list and Sender.

They have tables of their own (see ``models``) but are described here as
entities with properties, so that sequences can trigger on them and target them
exactly like a custom entity. ``COLUMNS`` maps a property name to its column
where the two differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlmodel import Session, SQLModel, select

from sequencer.enums import PropertyType
from sequencer.models import Contact, ContactList, Emailing, Entity, Property, Sender

logger = logging.getLogger(__name__)

EMAILING = "emailing"
CONTACT = "contact"
CONTACT_LIST = "contact_list"
SENDER = "sender"


@dataclass(frozen=True)
class SystemProperty:
    """A property of a system entity, as the dashboard and templates see it."""

    name: str
    label: str
    type: PropertyType
    required: bool = False
    read_only: bool = False
    column: str | None = None
    """The table column when it is not named like the property."""


T = PropertyType
SYSTEM_ENTITIES: dict[str, tuple[str, type[SQLModel], list[SystemProperty]]] = {
    EMAILING: (
        "Emailing",
        Emailing,
        [
            SystemProperty("reference", "Reference", T.TEXT),
            SystemProperty("subject", "Subject", T.TEXT, required=True),
            SystemProperty("message", "Message", T.TEXT, required=True),
            SystemProperty("html", "Html", T.TEXT),
            SystemProperty(
                "sender", "Sender", T.INTEGER, required=True, column="sender_id"
            ),
            SystemProperty("sender_name", "Sender name", T.TEXT),
            SystemProperty("sender_email", "Sender email", T.EMAIL),
            SystemProperty("reply_to", "Email reply", T.EMAIL),
            SystemProperty(
                "contact_list", "Contact list", T.LIST, column="contact_lists"
            ),
            SystemProperty("all_contacts", "All contact", T.BOOLEAN),
            SystemProperty("tag_filter", "Tag filter", T.LIST),
            SystemProperty("send_at", "Send at", T.DATETIME, required=True),
            SystemProperty("tracking", "Tracking", T.BOOLEAN),
            SystemProperty("total", "Total", T.INTEGER, read_only=True),
            SystemProperty("sent", "Sent", T.INTEGER, read_only=True),
            SystemProperty("open", "Open", T.INTEGER, read_only=True),
            SystemProperty("click", "Click", T.INTEGER, read_only=True),
            SystemProperty("unsubscribe", "Unsubscribe", T.INTEGER, read_only=True),
            SystemProperty("bounce", "Bounce", T.INTEGER, read_only=True),
            SystemProperty("status", "Status", T.TEXT),
        ],
    ),
    CONTACT: (
        "Contact",
        Contact,
        [
            SystemProperty("email", "Email", T.EMAIL, required=True),
            SystemProperty("name", "Name", T.TEXT),
            SystemProperty("tags", "Tags", T.LIST),
            SystemProperty("status", "Status", T.TEXT),
            SystemProperty("lists", "Lists", T.LIST),
        ],
    ),
    CONTACT_LIST: (
        "Contact list",
        ContactList,
        [
            SystemProperty("name", "Name", T.TEXT, required=True),
            SystemProperty("description", "Description", T.TEXT),
        ],
    ),
    SENDER: (
        "Sender",
        Sender,
        [
            SystemProperty("name", "Name", T.TEXT, required=True),
            SystemProperty("email", "Email", T.EMAIL, required=True),
            SystemProperty("reply_to", "Reply-to", T.EMAIL),
        ],
    ),
}


def column_of(entity_name: str, property_name: str) -> str:
    """The table column that holds a system entity's property."""
    for prop in SYSTEM_ENTITIES[entity_name][2]:
        if prop.name == property_name:
            return prop.column or prop.name
    return property_name


def ensure_system_entities(session: Session) -> None:
    """Create or complete the entity and property rows of the system entities.

    Idempotent: run by ``init`` on every start, so a release that adds a system
    property reaches existing databases.
    """
    for name, (label, _model, properties) in SYSTEM_ENTITIES.items():
        entity = session.exec(select(Entity).where(Entity.name == name)).first()
        if entity is None:
            entity = Entity(name=name, label=label, system=True)
            session.add(entity)
            session.flush()
            logger.info("created system entity %s (id %s)", name, entity.id)
        known = {
            p.name
            for p in session.exec(
                select(Property).where(Property.entity_id == entity.id)
            )
        }
        for position, prop in enumerate(properties):
            if prop.name in known:
                continue
            session.add(
                Property(
                    entity_id=entity.id,
                    name=prop.name,
                    label=prop.label,
                    type=prop.type,
                    required=prop.required,
                    read_only=prop.read_only,
                    position=position,
                )
            )
    session.flush()
