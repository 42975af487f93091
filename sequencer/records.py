"""Create, update and read records of any entity, firing sequences.

Every write goes through here. The row and its ``Event`` are committed in one
transaction (a transactional outbox), so a crash between the write and the
sequences loses no trigger: a pending event is picked up by the next pass.
Sequences run after that commit, so a failing sequence can never undo or block
the write; its error lands in the run log.

Writes happen in two steps that the engine and the CSV import reuse in bulk:
``prepare_create`` / ``prepare_update`` validate and stage a row, then
``finish_writes`` flushes the staged rows and adds their events.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import delete, insert
from sqlalchemy.orm.attributes import set_attribute, set_committed_value
from sqlmodel import Session

from sequencer import adapters
from sequencer.adapters import AfterFlush
from sequencer.config import get_settings
from sequencer.entities import EntityInfo, describe
from sequencer.enums import EventStatus, PropertyType, RecordAction, RunOutcome
from sequencer.exceptions import NotFoundError, ValidationError
from sequencer.models import Entity, Event, Record
from sequencer.system import EMAILING
from sequencer.timeutil import as_utc, utcnow
from sequencer.types import format_value, is_empty, parse_value, to_json, values_equal

logger = logging.getLogger(__name__)

SYSTEM_FIELDS = {"id", "created_at", "updated_at", "update_at"}
"""Keys every record shows but nobody sets; ignored when given back."""


@dataclass
class RunSummary:
    """What one sequence did on one event, as the dashboard's toast reports it."""

    sequence_id: int
    sequence_name: str
    event_id: int
    outcome: RunOutcome
    message: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class WriteResult:
    """The outcome of one create or update and of the sequences it fired."""

    record: dict[str, Any]
    event_id: int | None
    """None when an update changed nothing (and so fired nothing)."""
    created: bool
    runs: list[RunSummary] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a toast: ``2 sequences ran: emailing 41 created``."""
        done = [run for run in self.runs if run.outcome is RunOutcome.DONE]
        errors = [run for run in self.runs if run.outcome is RunOutcome.ERROR]
        if self.event_id is None:
            return "nothing changed"
        parts = []
        if done:
            written = [
                f"{item['entity']} {item['id']} {item['action']}d"
                for run in done
                for item in run.records
            ]
            noun = "sequence" if len(done) == 1 else "sequences"
            line = f"{len(done)} {noun} ran"
            parts.append(f"{line}: {', '.join(written)}" if written else line)
        for run in errors:
            parts.append(f"sequence '{run.sequence_name}' failed: {run.message}")
        return "; ".join(parts) or "no sequence ran"


@dataclass(frozen=True)
class Cascade:
    """Where a write sits in a chain of sequences started by one user write."""

    root_event_id: int | None = None
    depth: int = 0
    visited: tuple[str, ...] = ()
    sequence_id: int | None = None
    """The sequence whose action makes the write (stored on emailings)."""


@dataclass
class PendingWrite:
    """A validated, staged write whose event is added after the flush."""

    entity: EntityInfo
    action: RecordAction
    row: Any
    old: dict[str, Any]
    values: dict[str, Any]
    changed: list[str]
    after_flush: list[AfterFlush]
    cascade: Cascade | None = None
    event: EventRow | None = None

    def record(self, *, old: bool = False) -> dict[str, Any]:
        """The record as ``get_record`` returns it (before the write with ``old``)."""
        return _as_record(self.entity, self.row, self.old if old else self.values)


def _info(session: Session, entity: str | int | Entity | EntityInfo) -> EntityInfo:
    return describe(session, entity)


def _subject(info: EntityInfo, record_id: int | None) -> str:
    return info.name if record_id is None else f"{info.name} {record_id}"


def _as_record(info: EntityInfo, row: Any, values: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"id": row.id}
    record.update(values)
    if adapters.adapter_for(info).has_reference:
        record["reference"] = row.reference
    record["created_at"] = row.created_at
    record["updated_at"] = row.updated_at
    return record


def _parse(
    session: Session,
    info: EntityInfo,
    values: dict[str, Any],
    current: dict[str, Any],
    subject: str,
    now: datetime,
) -> dict[str, Any]:
    """Read each given value with its property's type."""
    adapter = adapters.adapter_for(info)
    zone = get_settings().timezone
    parsed: dict[str, Any] = {}
    for name, raw in values.items():
        if name in SYSTEM_FIELDS or name == "reference":
            continue
        prop = info.properties.get(name)
        if prop is None:
            if not adapter.free_attributes:
                info.property(name)
            parsed[name] = None if is_empty(raw) else str(raw).strip()
            continue
        if prop.read_only:
            if not is_empty(raw) and raw != current.get(name) and raw != 0:
                raise ValidationError(subject, name, "maintained by the system")
            continue
        parsed[name] = parse_value(
            prop.type, raw, subject=subject, field=name, timezone=zone, now=now
        )
    return parsed


def _check_required(info: EntityInfo, merged: dict[str, Any], subject: str) -> None:
    for name, prop in info.properties.items():
        if prop.required and is_empty(merged.get(name)):
            if info.name == EMAILING and name == "send_at":
                continue  # the emailing adapter decides: drafts need no date
            raise ValidationError(subject, name, "required")


def _check_lengths(info: EntityInfo, merged: dict[str, Any], subject: str) -> None:
    """Refuse text longer than its column, rather than let the database refuse it.

    PostgreSQL rejects such a row (SQLite would keep it), which would surface
    as a database error naming no field, or a sequence run lost in a retry.
    """
    model = adapters.adapter_for(info).model
    if model is Record:
        return
    columns = model.__table__.c
    for name, value in merged.items():
        if isinstance(value, str) and name in columns:
            length = getattr(columns[name].type, "length", None)
            if length and len(value) > length:
                raise ValidationError(
                    subject,
                    name,
                    f"at most {length} characters ({len(value)} given)",
                )


def _reference(raw: Any, subject: str) -> str:
    """The reference as stored; refused, not cut, when longer than its column.

    A cut reference would never again equal the value an update looks for.
    """
    text = str(raw).strip()
    if len(text) > 255:
        raise ValidationError(
            subject, "reference", f"at most 255 characters ({len(text)} given)"
        )
    return text


def prepare_create(
    session: Session,
    entity: str | int | Entity | EntityInfo,
    values: dict[str, Any],
    *,
    reference: str | None = None,
    now: datetime | None = None,
    cascade: Cascade | None = None,
) -> PendingWrite:
    """Validate ``values`` and stage a new row (not flushed, no event yet).

    :raises ValidationError: naming the entity and the field at fault.
    """
    now = as_utc(now) if now else utcnow()
    info = _info(session, entity)
    adapter = adapters.adapter_for(info)
    subject = _subject(info, None)
    parsed = _parse(session, info, values, {}, subject, now)
    merged = dict(parsed)
    _check_required(info, merged, subject)
    adapter.check(session, info, None, merged, parsed, subject)
    _check_lengths(info, merged, subject)
    for name, value in merged.items():
        parsed[name] = value
    reference = reference if reference is not None else values.get("reference")

    row = adapter.new_row(info)
    set_attribute(row, "created_at", now)
    set_attribute(row, "updated_at", now)
    if adapter.has_reference and not is_empty(reference):
        set_attribute(row, "reference", _reference(reference, subject))
    if info.name == EMAILING and cascade and cascade.sequence_id:
        row.sequence_id = cascade.sequence_id
    after = adapter.apply(session, info, row, parsed, now)
    if not isinstance(row, Record):
        session.add(row)  # custom records are inserted in bulk by finish_writes
    stored = {name: parsed.get(name) for name in info.properties}
    stored.update({k: v for k, v in parsed.items() if k not in stored})
    changed = [name for name, value in parsed.items() if not is_empty(value)]
    return PendingWrite(
        info, RecordAction.CREATE, row, {}, stored, changed, after, cascade
    )


def prepare_update(
    session: Session,
    entity: str | int | Entity | EntityInfo,
    row_or_id: Any,
    values: dict[str, Any],
    *,
    now: datetime | None = None,
) -> PendingWrite | None:
    """Validate ``values`` against a stored row and stage the change.

    :returns: None when nothing would change: no write and no event.
    :raises NotFoundError: when the record does not exist.
    """
    now = as_utc(now) if now else utcnow()
    info = _info(session, entity)
    adapter = adapters.adapter_for(info)
    row = row_or_id
    if isinstance(row_or_id, int):
        row = adapter.load(session, info, row_or_id)
        if row is None:
            raise NotFoundError(f"{info.name} record", row_or_id)
    subject = _subject(info, row.id)
    current = adapter.current(session, info, row)
    parsed = _parse(session, info, values, current, subject, now)
    merged = {**current, **parsed}
    _check_required(info, merged, subject)
    adapter.check(session, info, row, merged, parsed, subject)
    _check_lengths(info, merged, subject)
    changes = {
        name: value
        for name, value in merged.items()
        if not values_equal(_type_of(info, name), value, current.get(name))
    }
    new_reference = values.get("reference")
    reference_changed = (
        adapter.has_reference
        and "reference" in values
        and (new_reference or None) != (row.reference or None)
    )
    if not changes and not reference_changed:
        return None
    if reference_changed and not is_empty(new_reference):
        new_reference = _reference(new_reference, subject)

    old = dict(current)
    after = adapter.apply(session, info, row, changes, now)
    if reference_changed:
        row.reference = None if is_empty(new_reference) else new_reference
    set_attribute(row, "updated_at", now)
    session.add(row)
    return PendingWrite(
        info, RecordAction.UPDATE, row, old, merged, sorted(changes), after
    )


def _type_of(info: EntityInfo, name: str) -> PropertyType:
    prop = info.properties.get(name)
    return prop.type if prop else PropertyType.TEXT


def record_json(info: EntityInfo, record: dict[str, Any]) -> dict[str, Any]:
    """A record (as ``get_record`` returns it) in the JSON form events store."""
    return {name: to_json(None, value) for name, value in record.items()}


@dataclass
class EventRow:
    """A new event as the engine reads it, without an ORM object per row."""

    id: int
    entity_id: int
    record_id: int
    action: RecordAction
    old: dict[str, Any]
    new: dict[str, Any]
    changed: list[str]
    status: EventStatus
    root_event_id: int | None
    depth: int
    visited: list[str]


def finish_writes(
    session: Session,
    writes: Iterable[PendingWrite],
    *,
    now: datetime,
    cascade: Cascade | None = None,
    status_for: Any = None,
    worker_id: str | None = None,
) -> list[EventRow]:
    """Flush staged rows and insert one event per write, in the same transaction.

    :param cascade: where the writes sit in a cascade, for writes that do not
        carry their own.
    :param status_for: ``(entity_id, action) -> EventStatus`` for each new
        event: processed straight away when no sequence listens, claimed
        (processing) when the caller runs the sequences right after the
        commit, pending for a later pass otherwise.
    """
    writes = list(writes)
    if not writes:
        return []
    session.flush()
    _insert_records(session, [w for w in writes if w.row.id is None])
    for write in writes:
        for step in write.after_flush:
            step(session)
        if write.entity.system and write.action is RecordAction.CREATE:
            # Defaults the table fills in (counters, status) belong in the event.
            adapter = adapters.adapter_for(write.entity)
            write.values = adapter.current(session, write.entity, write.row)
    claimer = worker_id or get_settings().worker_id
    rows = []
    for write in writes:
        where = write.cascade or cascade or Cascade()
        status = (
            status_for(write.entity.id, write.action)
            if status_for
            else EventStatus.PENDING
        )
        claimed = status is EventStatus.PROCESSING
        rows.append(
            {
                "entity_id": write.entity.id,
                "record_id": write.row.id,
                "action": write.action,
                "old": record_json(write.entity, write.record(old=True))
                if write.action is RecordAction.UPDATE
                else {},
                "new": record_json(write.entity, write.record()),
                "changed": write.changed,
                "status": status,
                "root_event_id": where.root_event_id,
                "depth": where.depth,
                "visited": list(where.visited),
                "claimed_by": claimer if claimed else None,
                "claimed_at": now if claimed else None,
                "created_at": now,
                "processed_at": now if status is EventStatus.PROCESSED else None,
            }
        )
    table = Event.__table__
    statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
    ids = list(session.connection().scalars(statement, rows))
    events = []
    for write, row, event_id in zip(writes, rows, ids, strict=True):
        event = EventRow(
            id=event_id,
            entity_id=row["entity_id"],
            record_id=row["record_id"],
            action=row["action"],
            old=row["old"],
            new=row["new"],
            changed=row["changed"],
            status=row["status"],
            root_event_id=row["root_event_id"],
            depth=row["depth"],
            visited=row["visited"],
        )
        write.event = event
        events.append(event)
    return events


def _insert_records(session: Session, writes: list[PendingWrite]) -> None:
    """Insert new custom records in one statement and give each its id.

    They are not added to the session: an import or a cascade creates
    thousands, and the ORM's unit of work costs more than the insert itself.
    """
    if not writes:
        return
    table = Record.__table__
    rows = [
        {
            "entity_id": w.row.entity_id,
            "data": w.row.data,
            "reference": w.row.reference,
            "created_at": w.row.created_at,
            "updated_at": w.row.updated_at,
        }
        for w in writes
    ]
    statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
    ids = session.connection().scalars(statement, rows)
    for write, record_id in zip(writes, ids, strict=True):
        set_committed_value(write.row, "id", record_id)


def _write(
    session: Session,
    write: PendingWrite | None,
    *,
    now: datetime,
    run_sequences: bool,
    fallback: dict[str, Any] | None = None,
) -> WriteResult:
    """Commit one staged write with its event, then run what it triggers."""
    from sequencer import engine

    if write is None:
        session.rollback()
        return WriteResult(record=fallback or {}, event_id=None, created=False)
    try:
        status_for = engine.event_status(session, claim=run_sequences)
        (event,) = finish_writes(session, [write], now=now, status_for=status_for)
        record = write.record()
        session.commit()
    except BaseException:
        session.rollback()
        raise
    logger.info(
        "%s %s %s (event %s)",
        write.entity.name,
        record["id"],
        "created" if write.action is RecordAction.CREATE else "updated",
        event.id,
    )
    result = WriteResult(
        record=record,
        event_id=event.id,
        created=write.action is RecordAction.CREATE,
    )
    if run_sequences and event.status is EventStatus.PROCESSING:
        try:
            result.runs = engine.run_events(session, [event], now=now)
        except Exception:
            # The write stands; its claimed event is taken over by a later pass.
            session.rollback()
            logger.exception("sequences of event %s will run on a later pass", event.id)
    return result


def create_record(
    session: Session,
    entity: str | int | Entity | EntityInfo,
    values: dict[str, Any],
    *,
    reference: str | None = None,
    now: datetime | None = None,
    run_sequences: bool = True,
) -> WriteResult:
    """Create a record and commit it with its event; then run its sequences.

    :raises ValidationError: naming the field at fault; nothing is written.
    """
    now = as_utc(now) if now else utcnow()
    try:
        write = prepare_create(session, entity, values, reference=reference, now=now)
    except BaseException:
        session.rollback()
        raise
    return _write(session, write, now=now, run_sequences=run_sequences)


def update_record(
    session: Session,
    entity: str | int | Entity | EntityInfo,
    record_id: int,
    values: dict[str, Any],
    *,
    now: datetime | None = None,
    run_sequences: bool = True,
) -> WriteResult:
    """Change some values of a record; an update that changes nothing is no event.

    :raises NotFoundError: when the record does not exist.
    :raises ValidationError: naming the field at fault; nothing is written.
    """
    now = as_utc(now) if now else utcnow()
    try:
        write = prepare_update(session, entity, int(record_id), values, now=now)
        fallback = None if write else get_record(session, entity, int(record_id))
    except BaseException:
        session.rollback()
        raise
    return _write(
        session, write, now=now, run_sequences=run_sequences, fallback=fallback
    )


def get_record(
    session: Session, entity: str | int | Entity | EntityInfo, record_id: int
) -> dict[str, Any]:
    """A record's typed values with ``id``, ``created_at`` and ``updated_at``.

    :raises NotFoundError: when the record does not exist.
    """
    info = _info(session, entity)
    adapter = adapters.adapter_for(info)
    row = adapter.load(session, info, int(record_id))
    if row is None:
        raise NotFoundError(f"{info.name} record", record_id)
    return _as_record(info, row, adapter.current(session, info, row))


def template_context(info: EntityInfo, record: dict[str, Any]) -> dict[str, Any]:
    """The variables a template sees for a record (``{name}``, ``{update_at}``...)."""
    context = dict(record)
    context["update_at"] = record.get("updated_at")
    if "name" not in info.properties:
        key = info.name_property or next(
            (
                name
                for name, prop in info.properties.items()
                if prop.type is PropertyType.TEXT
            ),
            None,
        )
        name = record.get(key) if key else None
        context["name"] = name if not is_empty(name) else f"{info.label} {record['id']}"
    return context


def list_records(
    session: Session,
    entity: str | int | Entity | EntityInfo,
    *,
    limit: int | None = None,
    search: str | None = None,
) -> pd.DataFrame:
    """An entity's records as a table, newest last; ``search`` matches any value."""
    info = _info(session, entity)
    adapter = adapters.adapter_for(info)
    needle = (search or "").strip().lower()
    rows = []
    for row in session.scalars(adapter.rows(session, info)):
        record = _as_record(info, row, adapter.current(session, info, row))
        if needle and not any(
            needle in format_value(None, value).lower() for value in record.values()
        ):
            continue
        rows.append(record)
        if limit is not None and len(rows) >= limit:
            break
    columns = ["id", *info.properties]
    if adapter.has_reference:
        columns.append("reference")
    columns += ["created_at", "updated_at"]
    frame = pd.DataFrame(rows)
    for name in columns:
        if name not in frame.columns:
            frame[name] = pd.Series(dtype=object)
    extra = [name for name in frame.columns if name not in columns]
    return frame[columns + extra]


def delete_record(
    session: Session, entity: str | int | Entity | EntityInfo, record_id: int
) -> None:
    """Delete a record. Its events and runs stay in the log.

    :raises NotFoundError: when the record does not exist.
    """
    info = _info(session, entity)
    adapter = adapters.adapter_for(info)
    row = adapter.load(session, info, int(record_id))
    if row is None:
        raise NotFoundError(f"{info.name} record", record_id)
    if isinstance(row, Record):
        session.execute(delete(Record).where(Record.id == row.id))
    else:
        session.delete(row)
    session.commit()
    logger.info("%s %s deleted", info.name, record_id)
