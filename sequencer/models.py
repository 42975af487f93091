"""Database tables.

Custom entities (Clients, Produits, ...) keep their records in one ``record``
table with a JSON ``data`` column described by ``property`` rows. The system
entities (Emailing, Contact, Contact list, Sender) have tables of their own,
because delivery and tracking query them by column at scale; they are still
described by ``entity``/``property`` rows so that sequences, templates and the
dashboard treat every entity the same way.

The schema is owned by Alembic (``migrations/``); tests build it from this
metadata and a test checks that the migrations produce the same schema.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    Integer,
    Text,
    UniqueConstraint,
)
from sqlalchemy import Enum as SAEnum
from sqlmodel import Field, SQLModel

from sequencer.enums import (
    ContactStatus,
    DeliveryStatus,
    EmailingStatus,
    EventStatus,
    Match,
    PropertyType,
    RecordAction,
    RunOutcome,
    TrackingKind,
)
from sequencer.timeutil import UTCDateTime, utcnow


def _time(*, nullable: bool = False, index: bool = False) -> Any:
    """A UTC timestamp column, set to now when the row is created."""
    return Field(
        default_factory=utcnow if not nullable else None,
        sa_type=UTCDateTime,
        nullable=nullable,
        index=index,
    )


def _optional_time(*, index: bool = False) -> Any:
    """A UTC timestamp column that stays empty until something happens."""
    return Field(default=None, sa_type=UTCDateTime, nullable=True, index=index)


def _enum(kind: type[StrEnum], default: Any = None, *, index: bool = False) -> Any:
    """An enum column stored as its lowercase value in a plain VARCHAR.

    Not a native PostgreSQL enum: adding a member then needs no migration.
    """
    column_type = SAEnum(
        kind,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [member.value for member in members],
    )
    if default is None:
        return Field(sa_type=column_type, index=index)
    return Field(default=default, sa_type=column_type, index=index)


def _json(default: Any) -> Any:
    """A JSON column; ``default`` is a factory such as ``dict`` or ``list``."""
    return Field(default_factory=default, sa_column=Column(JSON, nullable=False))


# --- Entities and records -------------------------------------------------


class Entity(SQLModel, table=True):
    """A kind of record: a custom one defined by an admin, or a system one."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    """Key used in templates, references and the CLI, e.g. ``produits``."""
    label: str = Field(max_length=128)
    """What the dashboard shows, e.g. ``Produits``."""
    system: bool = False
    """True for Emailing, Contact, Contact list and Sender."""
    name_property: str | None = Field(default=None, max_length=64)
    """The property that ``{name}`` stands for when the entity has no ``name``."""
    created_at: datetime = _time()
    updated_at: datetime = _time()


class Property(SQLModel, table=True):
    """A typed field of an entity."""

    __table_args__ = (UniqueConstraint("entity_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    entity_id: int = Field(foreign_key="entity.id", index=True, ondelete="CASCADE")
    name: str = Field(max_length=64)
    label: str = Field(max_length=128)
    type: PropertyType = _enum(PropertyType, PropertyType.TEXT)
    required: bool = False
    position: int = 0
    read_only: bool = False
    """Maintained by the system (emailing counters); never typed in."""


class Record(SQLModel, table=True):
    """A record of a custom entity; its values live in ``data``."""

    id: int | None = Field(default=None, primary_key=True)
    entity_id: int = Field(foreign_key="entity.id", index=True, ondelete="CASCADE")
    data: dict[str, Any] = _json(dict)
    reference: str | None = Field(default=None, max_length=255, index=True)
    """Link to the record an action created it from, e.g. ``produits/57``."""
    created_at: datetime = _time()
    updated_at: datetime = _time()


class EntityGroup(SQLModel, table=True):
    """A named list of entities that organises sequences and statistics."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True)
    created_at: datetime = _time()
    updated_at: datetime = _time()


class EntityGroupMember(SQLModel, table=True):
    """One entity's membership of one group."""

    group_id: int = Field(
        foreign_key="entitygroup.id", primary_key=True, ondelete="CASCADE"
    )
    entity_id: int = Field(
        foreign_key="entity.id", primary_key=True, ondelete="CASCADE"
    )


# --- System entities --------------------------------------------------------


class Sender(SQLModel, table=True):
    """Who an emailing comes from."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=255)
    email: str = Field(max_length=320)
    reply_to: str | None = Field(default=None, max_length=320)
    created_at: datetime = _time()
    updated_at: datetime = _time()


class Contact(SQLModel, table=True):
    """A person who can receive emailings. ``email`` is stored lower-cased."""

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=320, unique=True, index=True)
    name: str = Field(default="", max_length=255)
    attributes: dict[str, Any] = _json(dict)
    tags: list[str] = _json(list)
    """Mirrored in ``contact_tag`` so the tag filter runs in SQL."""
    status: ContactStatus = _enum(ContactStatus, ContactStatus.SUBSCRIBED, index=True)
    unsubscribed_at: datetime | None = _optional_time()
    bounced_at: datetime | None = _optional_time()
    created_at: datetime = _time()
    updated_at: datetime = _time()


class ContactTag(SQLModel, table=True):
    """One tag of one contact, for filtering recipients in SQL."""

    contact_id: int = Field(
        foreign_key="contact.id", primary_key=True, ondelete="CASCADE"
    )
    tag: str = Field(max_length=64, primary_key=True, index=True)


class ContactList(SQLModel, table=True):
    """A named list of contacts that emailings are sent to."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=255, unique=True)
    description: str = Field(default="", max_length=1000)
    created_at: datetime = _time()
    updated_at: datetime = _time()


class ContactListMember(SQLModel, table=True):
    """One contact's membership of one list."""

    list_id: int = Field(
        foreign_key="contactlist.id", primary_key=True, ondelete="CASCADE"
    )
    contact_id: int = Field(
        foreign_key="contact.id", primary_key=True, index=True, ondelete="CASCADE"
    )


class Emailing(SQLModel, table=True):
    """One email campaign: what to send, to whom, when, and how it went."""

    __table_args__ = (Index("ix_emailing_due", "status", "send_at"),)

    id: int | None = Field(default=None, primary_key=True)
    reference: str | None = Field(default=None, max_length=255, index=True)
    sequence_id: int | None = Field(default=None, foreign_key="sequence.id", index=True)
    subject: str = Field(max_length=998)
    message: str = Field(default="", sa_type=Text)
    html: str = Field(default="", sa_type=Text)
    sender_id: int = Field(foreign_key="sender.id")
    sender_name: str = Field(default="", max_length=255)
    sender_email: str = Field(default="", max_length=320)
    reply_to: str | None = Field(default=None, max_length=320)
    contact_lists: list[int] = _json(list)
    all_contacts: bool = False
    tag_filter: list[str] = _json(list)
    send_at: datetime | None = _optional_time()
    tracking: bool = True
    """False for privacy: no pixel, links left as written."""
    status: EmailingStatus = _enum(EmailingStatus, EmailingStatus.PENDING)
    note: str = Field(default="", max_length=2000)
    """A human-readable note from the system, e.g. why it ended with no recipient."""
    total: int = 0
    sent: int = 0
    open: int = 0
    click: int = 0
    unsubscribe: int = 0
    bounce: int = 0
    open_any: int = 0
    """Recipients who opened, machines (privacy proxies) included; see ``open``."""
    click_any: int = 0
    """Recipients who clicked, machines (security scanners) included."""
    recipients_resolved: bool = False
    """Delivery rows exist for every recipient; ``total`` is final."""
    claimed_by: str | None = Field(default=None, max_length=128)
    claimed_at: datetime | None = _optional_time()
    started_at: datetime | None = _optional_time()
    finished_at: datetime | None = _optional_time()
    created_at: datetime = _time()
    updated_at: datetime = _time()


class Delivery(SQLModel, table=True):
    """One recipient of one emailing: the unit of sending and of tracking."""

    __table_args__ = (
        UniqueConstraint("emailing_id", "contact_id"),
        # In the claim's own order, so a claim reads its batch and stops
        # rather than sorting every queued delivery of the emailing.
        Index("ix_delivery_claim", "emailing_id", "status", "next_attempt_at", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    emailing_id: int = Field(foreign_key="emailing.id", ondelete="CASCADE")
    contact_id: int | None = Field(
        default=None, foreign_key="contact.id", index=True, ondelete="SET NULL"
    )
    email: str = Field(max_length=320)
    status: DeliveryStatus = _enum(DeliveryStatus, DeliveryStatus.QUEUED)
    attempts: int = 0
    smtp_reply: str = Field(default="", max_length=2000)
    message_id: str | None = Field(default=None, max_length=255)
    claimed_by: str | None = Field(default=None, max_length=128)
    claimed_at: datetime | None = _optional_time()
    next_attempt_at: datetime | None = _optional_time()
    sent_at: datetime | None = _optional_time()
    first_open_at: datetime | None = _optional_time()
    """First open by a person; machine opens (privacy proxies) left out."""
    first_click_at: datetime | None = _optional_time()
    """First click by a person; security scanners left out."""
    first_open_any_at: datetime | None = _optional_time()
    """First open by anyone, machines included ("all activity" statistics)."""
    first_click_any_at: datetime | None = _optional_time()
    """First click by anyone, machines included."""
    unsubscribed_at: datetime | None = _optional_time()
    bounced_at: datetime | None = _optional_time()
    created_at: datetime = _time()
    updated_at: datetime = _time()


class Link(SQLModel, table=True):
    """A distinct URL written in an emailing; the only click redirect targets."""

    __table_args__ = (UniqueConstraint("emailing_id", "url_hash"),)

    id: int | None = Field(default=None, primary_key=True)
    emailing_id: int = Field(foreign_key="emailing.id", index=True, ondelete="CASCADE")
    url: str = Field(sa_type=Text)
    url_hash: str = Field(max_length=64)
    """SHA-256 of ``url``: URLs are too long for a portable unique index."""
    clicks: int = 0
    """Clicks by people, kept with the events (top links read it)."""
    machine_clicks: int = 0
    """Clicks flagged as a security scanner's."""
    created_at: datetime = _time()


class TrackingEvent(SQLModel, table=True):
    """An append-only open, click, unsubscribe or bounce of one delivery."""

    __table_args__ = (
        Index("ix_trackingevent_emailing_kind", "emailing_id", "kind", "occurred_at"),
        Index("ix_trackingevent_link", "link_id", "delivery_id"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True
        ),
    )
    """64-bit: a busy year of opens outgrows a 32-bit id."""
    kind: TrackingKind = _enum(TrackingKind)
    emailing_id: int = Field(index=True)
    delivery_id: int | None = Field(default=None, index=True)
    contact_id: int | None = None
    link_id: int | None = None
    occurred_at: datetime = _time(index=True)
    user_agent: str = Field(default="", max_length=512)
    client_hash: str = Field(default="", max_length=64)
    """Hash of the client address: enough to tell proxies apart, not a person."""
    machine: bool = False
    """Flagged as a privacy proxy or security scanner rather than a person."""
    machine_reason: str = Field(default="", max_length=128)


class TrackingHour(SQLModel, table=True):
    """Opens and clicks of one emailing in one hour, people and machines apart.

    A rollup of ``TrackingEvent`` kept by the event writer in the same
    transaction as the events, so the statistics chart reads a few rows per
    hour instead of every event; rebuilt from the events by
    ``counters.recompute_counters``.
    """

    emailing_id: int = Field(primary_key=True)
    hour: datetime = Field(sa_type=UTCDateTime, primary_key=True)
    """The start of the hour, in UTC."""
    kind: TrackingKind = Field(
        sa_type=SAEnum(
            TrackingKind,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda members: [member.value for member in members],
        ),
        primary_key=True,
    )
    machine: bool = Field(default=False, primary_key=True)
    events: int = 0


# --- Sequences ----------------------------------------------------------------


class Sequence(SQLModel, table=True):
    """A rule: when a record of an entity changes, act on another entity."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=255, unique=True)
    active: bool = True
    trigger_entity_id: int = Field(foreign_key="entity.id", index=True)
    trigger_action: RecordAction = _enum(RecordAction)
    watched_property: str | None = Field(default=None, max_length=64)
    conditions: list[dict[str, Any]] = _json(list)
    """Rules as ``{"property": ..., "operator": ..., "value": ...}``."""
    match: Match = _enum(Match, Match.ALL)
    target_entity_id: int = Field(foreign_key="entity.id")
    target_action: RecordAction = _enum(RecordAction)
    fields: dict[str, str] = _json(dict)
    """A template per target field."""
    reference: str | None = Field(default=None, max_length=1000)
    """Template for the reference: stored on create, selects records on update."""
    created_at: datetime = _time()
    updated_at: datetime = _time()


class Event(SQLModel, table=True):
    """A record create or update, committed with the write (the outbox)."""

    __table_args__ = (Index("ix_event_pending", "status", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    entity_id: int = Field(foreign_key="entity.id")
    record_id: int
    action: RecordAction = _enum(RecordAction)
    old: dict[str, Any] = _json(dict)
    new: dict[str, Any] = _json(dict)
    changed: list[str] = _json(list)
    status: EventStatus = _enum(EventStatus, EventStatus.PENDING)
    root_event_id: int | None = None
    """The event that started this cascade; None for a user's own write."""
    depth: int = 0
    """How many sequence actions lie between the user's write and this event."""
    visited: list[str] = _json(list)
    """``"<sequence id>:<entity>/<record id>"`` already run in this cascade."""
    claimed_by: str | None = Field(default=None, max_length=128)
    claimed_at: datetime | None = _optional_time()
    created_at: datetime = _time(index=True)
    processed_at: datetime | None = _optional_time()


class SequenceRun(SQLModel, table=True):
    """The outcome of one sequence on one event; unique, so it runs once."""

    __table_args__ = (UniqueConstraint("sequence_id", "event_id"),)

    id: int | None = Field(default=None, primary_key=True)
    sequence_id: int = Field(foreign_key="sequence.id", index=True, ondelete="CASCADE")
    event_id: int = Field(foreign_key="event.id", index=True)
    outcome: RunOutcome = _enum(RunOutcome)
    message: str = Field(default="", sa_type=Text)
    records: list[dict[str, Any]] = _json(list)
    """What the action wrote: ``{"entity": ..., "id": ..., "action": ...}``."""
    duration_ms: float = 0.0
    created_at: datetime = _time(index=True)


# --- Operations -----------------------------------------------------------------


class WorkerHeartbeat(SQLModel, table=True):
    """The last sign of life of each scheduler, shown on the Settings page."""

    worker_id: str = Field(primary_key=True, max_length=128)
    hostname: str = Field(default="", max_length=255)
    pid: int = 0
    started_at: datetime = _time()
    last_beat: datetime = _time()
    last_pass: dict[str, Any] = _json(dict)
    """What the last pass did: events processed, emailings dispatched, ..."""


class Setting(SQLModel, table=True):
    """A value the system generates once and keeps, such as the secret key."""

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(sa_type=Text)
