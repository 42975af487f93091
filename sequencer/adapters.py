"""How each kind of entity keeps its records: one adapter per storage.

Custom entities keep their values in ``record.data``; the system entities
(Emailing, Contact, Contact list, Sender) in columns of their own, with rules of
their own (a contact's email is unique, an emailing needs a known sender). The
records API validates and writes every entity through the same four steps, so
a sequence or an import treats a contact exactly like a product.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.attributes import set_attribute
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlmodel import Session, SQLModel

from sequencer import system
from sequencer.entities import EntityInfo
from sequencer.enums import ContactStatus, EmailingStatus
from sequencer.exceptions import ValidationError
from sequencer.models import (
    Contact,
    ContactList,
    ContactListMember,
    ContactTag,
    Emailing,
    Record,
    Sender,
)
from sequencer.types import from_json, is_empty, to_json

AfterFlush = Callable[[Session], None]
"""A step that needs the row's id, such as writing a contact's list memberships."""

EDITABLE_EMAILING = {EmailingStatus.DRAFT, EmailingStatus.PENDING}


class Adapter:
    """Reads and writes the records of one kind of entity."""

    model: type[SQLModel] = Record
    has_reference = True
    free_attributes = False
    """True when keys that are not properties are kept (a contact's attributes)."""

    def new_row(self, info: EntityInfo) -> Any:
        return self.model()

    def load(self, session: Session, info: EntityInfo, record_id: int) -> Any:
        return session.get(self.model, record_id)

    def rows(self, session: Session, info: EntityInfo) -> Any:
        return select(self.model).order_by(self.model.id)

    def current(self, session: Session, info: EntityInfo, row: Any) -> dict[str, Any]:
        """The typed value of every property of a stored row."""
        return {
            name: from_json(prop.type, getattr(row, system.column_of(info.name, name)))
            for name, prop in info.properties.items()
        }

    def check(
        self,
        session: Session,
        info: EntityInfo,
        row: Any | None,
        merged: dict[str, Any],
        given: dict[str, Any],
        subject: str,
    ) -> None:
        """Entity rules beyond each value's type; may fill defaults in ``merged``."""

    def apply(
        self,
        session: Session,
        info: EntityInfo,
        row: Any,
        values: dict[str, Any],
        now: datetime,
    ) -> list[AfterFlush]:
        for name, value in values.items():
            setattr(row, system.column_of(info.name, name), value)
        return []


def _holder(session: Session, id_column: Any, unique: Any, row: Any | None) -> Any:
    """The id of another row that already holds a value meant to be unique."""
    taken = session.scalars(select(id_column).where(unique)).first()
    if taken is None or (row is not None and taken == row.id):
        return None
    return taken


class CustomAdapter(Adapter):
    """Custom entities: every value in the JSON ``data`` column."""

    def new_row(self, info: EntityInfo) -> Record:
        return fast_row(Record, entity_id=info.id, data={}, reference=None)

    def load(self, session: Session, info: EntityInfo, record_id: int) -> Any:
        row = session.get(Record, record_id)
        return row if row is not None and row.entity_id == info.id else None

    def rows(self, session: Session, info: EntityInfo) -> Any:
        return select(Record).where(Record.entity_id == info.id).order_by(Record.id)

    def current(self, session: Session, info: EntityInfo, row: Any) -> dict[str, Any]:
        data = row.data or {}
        return {
            name: from_json(prop.type, data.get(name))
            for name, prop in info.properties.items()
        }

    def apply(
        self,
        session: Session,
        info: EntityInfo,
        row: Any,
        values: dict[str, Any],
        now: datetime,
    ) -> list[AfterFlush]:
        data = dict(row.data or {})
        for name, value in values.items():
            data[name] = to_json(info.properties[name].type, value)
        set_attribute(row, "data", data)
        return []


_MANAGERS: dict[type, Any] = {}


def fast_row(model: type[SQLModel], **values: Any) -> Any:
    """A new row without pydantic's per-instance validation.

    Creating a table model through its constructor costs tens of microseconds
    in validation that the records API has already done; imports and cascades
    create tens of thousands of rows, so custom records are built this way.
    """
    manager = _MANAGERS.get(model)
    if manager is None:
        configure_mappers()
        manager = _MANAGERS[model] = manager_of_class(model)
    row = manager.new_instance()
    for name, value in values.items():
        set_attribute(row, name, value)
    return row


def _sender(session: Session, sender_id: Any) -> Sender | None:
    cache: dict[int, Sender | None] = session.info.setdefault("sequencer.senders", {})
    if sender_id not in cache:
        cache[sender_id] = session.get(Sender, sender_id)
    return cache[sender_id]


def _list_ids(session: Session, raw: list[Any], subject: str, field: str) -> list[int]:
    ids: list[int] = []
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValidationError(subject, field, f"{item!r} is not a contact list id")
        if item not in ids:
            ids.append(item)
    if ids:
        found = set(
            session.scalars(select(ContactList.id).where(ContactList.id.in_(ids)))
        )
        missing = [str(item) for item in ids if item not in found]
        if missing:
            raise ValidationError(
                subject, field, f"no contact list with id {', '.join(missing)}"
            )
    return ids


class EmailingAdapter(Adapter):
    """Emailings: a known sender, existing lists, and a status only the system moves."""

    model = Emailing

    def current(self, session: Session, info: EntityInfo, row: Any) -> dict[str, Any]:
        values = super().current(session, info, row)
        values["status"] = EmailingStatus(row.status).value
        return values

    def check(
        self,
        session: Session,
        info: EntityInfo,
        row: Any | None,
        merged: dict[str, Any],
        given: dict[str, Any],
        subject: str,
    ) -> None:
        if row is not None and EmailingStatus(row.status) not in EDITABLE_EMAILING:
            raise ValidationError(
                subject,
                None,
                f"it is {EmailingStatus(row.status).value} and can no longer change",
            )
        status = str(merged.get("status") or EmailingStatus.PENDING.value).lower()
        if status not in {member.value for member in EDITABLE_EMAILING}:
            raise ValidationError(
                subject,
                "status",
                f"{status!r} is set by the system; choose draft or pending",
            )
        merged["status"] = status
        if status == EmailingStatus.PENDING and merged.get("send_at") is None:
            raise ValidationError(
                subject, "send_at", "required (or save the emailing as a draft)"
            )
        sender = _sender(session, merged.get("sender"))
        if sender is None:
            reason = "required" if merged.get("sender") is None else "no such sender"
            raise ValidationError(
                subject, "sender", f"{reason} ({merged.get('sender')})"
            )
        if row is None or "sender" in given:
            # A new emailing, or a new sender: what was not typed comes from it.
            for name, default in (
                ("sender_name", sender.name),
                ("sender_email", sender.email),
                ("reply_to", sender.reply_to),
            ):
                if is_empty(given.get(name)):
                    merged[name] = default
        merged["contact_list"] = _list_ids(
            session, merged.get("contact_list") or [], subject, "contact_list"
        )
        merged["tag_filter"] = [str(tag) for tag in merged.get("tag_filter") or []]
        if merged.get("tracking") is None:
            merged["tracking"] = True
        if merged.get("all_contacts") is None:
            merged["all_contacts"] = False

    def apply(
        self,
        session: Session,
        info: EntityInfo,
        row: Any,
        values: dict[str, Any],
        now: datetime,
    ) -> list[AfterFlush]:
        values = dict(values)
        if "status" in values:
            row.status = EmailingStatus(values.pop("status"))
        for name in ("message", "html", "sender_name", "sender_email"):
            if name in values and values[name] is None:
                values[name] = ""
        return super().apply(session, info, row, values, now)


class ContactAdapter(Adapter):
    """Contacts: unique lower-cased email, tags and lists kept in their own tables."""

    model = Contact
    has_reference = False
    free_attributes = True

    def current(self, session: Session, info: EntityInfo, row: Any) -> dict[str, Any]:
        values = {
            "email": row.email,
            "name": row.name or None,
            "tags": list(row.tags or []),
            "status": ContactStatus(row.status).value,
            "lists": [],
        }
        if row.id is not None:
            values["lists"] = list(
                session.scalars(
                    select(ContactListMember.list_id)
                    .where(ContactListMember.contact_id == row.id)
                    .order_by(ContactListMember.list_id)
                )
            )
        values.update(row.attributes or {})
        return values

    def check(
        self,
        session: Session,
        info: EntityInfo,
        row: Any | None,
        merged: dict[str, Any],
        given: dict[str, Any],
        subject: str,
    ) -> None:
        email = merged.get("email")
        if "email" in given and email and (row is None or row.email != email):
            taken = _holder(
                session, Contact.id, func.lower(Contact.email) == email, row
            )
            if taken is not None:
                raise ValidationError(
                    subject, "email", f"{email!r} belongs to contact {taken}"
                )
        status = merged.get("status")
        if is_empty(status):
            # A blank status (an empty CSV cell, a cleared field) keeps the one
            # stored: it must never re-subscribe someone who unsubscribed.
            status = (
                ContactStatus(row.status).value
                if row is not None
                else ContactStatus.SUBSCRIBED.value
            )
        status = str(status).strip().lower()
        if status not in {member.value for member in ContactStatus}:
            choices = ", ".join(member.value for member in ContactStatus)
            raise ValidationError(
                subject, "status", f"{status!r} is not one of {choices}"
            )
        merged["status"] = status
        tags: list[str] = []
        for tag in merged.get("tags") or []:
            text = str(tag).strip()
            if len(text) > 64:
                raise ValidationError(
                    subject, "tags", f"tag {text[:20]!r}... is too long"
                )
            if text and text not in tags:
                tags.append(text)
        merged["tags"] = tags
        merged["lists"] = _list_ids(
            session, merged.get("lists") or [], subject, "lists"
        )

    def apply(
        self,
        session: Session,
        info: EntityInfo,
        row: Any,
        values: dict[str, Any],
        now: datetime,
    ) -> list[AfterFlush]:
        steps: list[AfterFlush] = []
        attributes = dict(row.attributes or {})
        for name, value in values.items():
            if name == "email":
                row.email = value
            elif name == "name":
                row.name = value or ""
            elif name == "status":
                self._set_status(row, ContactStatus(value), now)
            elif name == "tags":
                row.tags = list(value)
                steps.append(lambda s, tags=list(value): self._sync_tags(s, row, tags))
            elif name == "lists":
                steps.append(lambda s, ids=list(value): self._sync_lists(s, row, ids))
            elif is_empty(value):
                attributes.pop(name, None)
            else:
                attributes[name] = value
        if attributes != (row.attributes or {}):
            row.attributes = attributes
        return steps

    @staticmethod
    def _set_status(row: Contact, status: ContactStatus, now: datetime) -> None:
        row.status = status
        if status is ContactStatus.UNSUBSCRIBED and row.unsubscribed_at is None:
            row.unsubscribed_at = now
        if status is ContactStatus.BOUNCED and row.bounced_at is None:
            row.bounced_at = now

    @staticmethod
    def _sync_tags(session: Session, row: Contact, tags: list[str]) -> None:
        session.execute(delete(ContactTag).where(ContactTag.contact_id == row.id))
        session.add_all(ContactTag(contact_id=row.id, tag=tag) for tag in tags)

    @staticmethod
    def _sync_lists(session: Session, row: Contact, ids: list[int]) -> None:
        session.execute(
            delete(ContactListMember).where(ContactListMember.contact_id == row.id)
        )
        session.add_all(ContactListMember(list_id=i, contact_id=row.id) for i in ids)


class ContactListAdapter(Adapter):
    """Contact lists: a unique name."""

    model = ContactList
    has_reference = False

    def check(
        self,
        session: Session,
        info: EntityInfo,
        row: Any | None,
        merged: dict[str, Any],
        given: dict[str, Any],
        subject: str,
    ) -> None:
        name = merged.get("name")
        if "name" in given and name:
            taken = _holder(session, ContactList.id, ContactList.name == name, row)
            if taken is not None:
                raise ValidationError(
                    subject, "name", f"list {taken} is named {name!r}"
                )
        if merged.get("description") is None:
            merged["description"] = ""


class SenderAdapter(Adapter):
    """Senders: a name and a valid address, one sender per address.

    A configuration document matches senders by address, so two senders with
    one address could not be told apart when it is imported.
    """

    model = Sender
    has_reference = False

    def check(
        self,
        session: Session,
        info: EntityInfo,
        row: Any | None,
        merged: dict[str, Any],
        given: dict[str, Any],
        subject: str,
    ) -> None:
        email = merged.get("email")
        if "email" in given and email:
            lowered = str(email).lower()
            taken = _holder(
                session, Sender.id, func.lower(Sender.email) == lowered, row
            )
            if taken is not None:
                raise ValidationError(
                    subject, "email", f"{email!r} belongs to sender {taken}"
                )


ADAPTERS: dict[str, Adapter] = {
    system.EMAILING: EmailingAdapter(),
    system.CONTACT: ContactAdapter(),
    system.CONTACT_LIST: ContactListAdapter(),
    system.SENDER: SenderAdapter(),
}
CUSTOM = CustomAdapter()


def adapter_for(info: EntityInfo) -> Adapter:
    """The adapter that stores this entity's records."""
    return ADAPTERS.get(info.name, CUSTOM) if info.system else CUSTOM
