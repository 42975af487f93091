"""Sequences: saving them validated, listing them, and spotting cycles.

A sequence cannot be saved in a state that would fail on every record: unknown
variables, condition values of the wrong type, missing required target fields
and unknown senders or lists are all refused at save time, each error naming
the sequence and the field. A cycle it can start is saved but warned about.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import Integer, func, select, update
from sqlmodel import Session

from sequencer import engine
from sequencer.conditions import build
from sequencer.entities import EntityInfo, describe, variables_of
from sequencer.enums import Match, RecordAction, RunOutcome
from sequencer.exceptions import NotFoundError, ValidationError
from sequencer.models import (
    ContactList,
    Emailing,
    EntityGroupMember,
    Sender,
    Sequence,
    SequenceRun,
)
from sequencer.system import EMAILING
from sequencer.templating import check_template
from sequencer.timeutil import as_utc, utcnow
from sequencer.types import is_empty, parse_value

logger = logging.getLogger(__name__)


@dataclass
class SequenceIn:
    """A sequence as a form or a config file describes it (entities by name)."""

    name: str
    trigger_entity: str | int
    trigger_action: RecordAction | str = RecordAction.UPDATE
    target_entity: str | int = EMAILING
    target_action: RecordAction | str = RecordAction.CREATE
    fields: dict[str, str] = field(default_factory=dict)
    conditions: list[dict[str, Any]] = field(default_factory=list)
    match: Match | str = Match.ALL
    watched_property: str | None = None
    reference: str | None = None
    active: bool = True

    @classmethod
    def from_model(cls, session: Session, sequence: Sequence) -> SequenceIn:
        """The editable form of a stored sequence."""
        return cls(
            name=sequence.name,
            trigger_entity=describe(session, sequence.trigger_entity_id).name,
            trigger_action=RecordAction(sequence.trigger_action),
            target_entity=describe(session, sequence.target_entity_id).name,
            target_action=RecordAction(sequence.target_action),
            fields=dict(sequence.fields or {}),
            conditions=[dict(rule) for rule in sequence.conditions or []],
            match=Match(sequence.match),
            watched_property=sequence.watched_property,
            reference=sequence.reference,
            active=sequence.active,
        )


@dataclass
class SaveResult:
    """The saved sequence and what its author should know (possible cycles)."""

    sequence: Sequence
    warnings: list[str] = field(default_factory=list)


def _choice(kind: type, raw: Any, subject: str, name: str) -> Any:
    try:
        return kind(str(raw).strip().lower())
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ValidationError(
            subject, name, f"{raw!r} is not one of {choices}"
        ) from None


def _entity(session: Session, key: Any, subject: str, name: str) -> EntityInfo:
    try:
        return describe(session, key)
    except NotFoundError:
        raise ValidationError(subject, name, f"no entity {key!r}") from None


def to_model(session: Session, data: SequenceIn) -> Sequence:
    """Validate ``data`` and build an unsaved ``Sequence`` from it.

    :raises ValidationError: naming the sequence and the field at fault.
    """
    name = (data.name or "").strip()
    subject = f"sequence '{name}'"
    if not name:
        raise ValidationError("sequence", "name", "required")
    trigger = _entity(session, data.trigger_entity, subject, "trigger entity")
    target = _entity(session, data.target_entity, subject, "target entity")
    trigger_action = _choice(
        RecordAction, data.trigger_action, subject, "trigger action"
    )
    target_action = _choice(RecordAction, data.target_action, subject, "target action")
    match = _choice(Match, data.match or Match.ALL, subject, "match")

    watched = str(data.watched_property or "").strip() or None
    if watched is not None:
        if trigger_action is not RecordAction.UPDATE:
            raise ValidationError(subject, "watched property", "only for Update")
        if watched not in trigger.properties:
            known = ", ".join(trigger.properties)
            raise ValidationError(
                subject,
                "watched property",
                f"{watched}: no such property of {trigger.name} (properties: {known})",
            )

    conditions = []
    for number, rule in enumerate(data.conditions or [], start=1):
        condition = build(rule, trigger, subject=subject, index=number)
        clean = {"property": condition.property, "operator": condition.operator.value}
        if condition.value is not None:
            clean["value"] = condition.value
        conditions.append(clean)

    variables = variables_of(session, trigger)
    fields = {}
    for field_name, template in (data.fields or {}).items():
        if template is None or str(template) == "":
            continue
        prop = target.property(field_name) if field_name in target.properties else None
        if prop is None:
            known = ", ".join(target.properties)
            raise ValidationError(
                subject,
                field_name,
                f"{target.name} has no such field (fields: {known})",
            )
        if prop.read_only:
            raise ValidationError(subject, field_name, "maintained by the system")
        template = str(template)
        check_template(template, variables, subject=subject, field=field_name)
        if "{" not in template:
            _check_constant(session, subject, target, field_name, template)
        fields[field_name] = template

    reference = str(data.reference or "").strip() or None
    check_template(reference, variables, subject=subject, field="reference")
    if target_action is RecordAction.CREATE:
        _check_required(subject, target, fields)
    elif reference is None and target.id != trigger.id:
        raise ValidationError(
            subject,
            "reference",
            f"required: which {target.name} records should change "
            "(a reference value or a record id such as {client_id})",
        )
    return Sequence(
        name=name,
        active=bool(data.active),
        trigger_entity_id=trigger.id,
        trigger_action=trigger_action,
        watched_property=watched,
        conditions=conditions,
        match=match,
        target_entity_id=target.id,
        target_action=target_action,
        fields=fields,
        reference=reference,
    )


def _check_required(subject: str, target: EntityInfo, fields: dict[str, str]) -> None:
    draft = str(fields.get("status", "")).strip().lower() == "draft"
    for name, prop in target.properties.items():
        if not prop.required or name in fields:
            continue
        if target.name == EMAILING and name == "send_at" and draft:
            continue
        raise ValidationError(
            subject, name, f"required: the action creates {target.name} records"
        )


def _check_constant(
    session: Session, subject: str, target: EntityInfo, name: str, text: str
) -> None:
    """A field written without variables is checked now rather than at run time."""
    value = parse_value(
        target.properties[name].type, text, subject=subject, field=name, now=utcnow()
    )
    if target.name != EMAILING or is_empty(value):
        return
    if name == "status" and str(value).strip().lower() not in ("draft", "pending"):
        raise ValidationError(
            subject, name, f"{value!r} is set by the system; choose draft or pending"
        )
    if name == "sender" and session.get(Sender, value) is None:
        raise ValidationError(subject, name, f"no sender with id {value}")
    if name == "contact_list":
        for item in value:
            if not isinstance(item, int) or session.get(ContactList, item) is None:
                raise ValidationError(subject, name, f"no contact list with id {item}")


def cycle_warnings(session: Session, candidate: Sequence) -> list[str]:
    """Describe a cycle the sequence can start, through itself or others."""
    edges: dict[tuple[int, RecordAction], list[Sequence]] = {}
    others = session.scalars(select(Sequence).where(Sequence.active.is_(True)))
    for sequence in [*(s for s in others if s.id != candidate.id), candidate]:
        node = (sequence.trigger_entity_id, RecordAction(sequence.trigger_action))
        edges.setdefault(node, []).append(sequence)
    start = (candidate.trigger_entity_id, RecordAction(candidate.trigger_action))

    def label(node: tuple[int, RecordAction]) -> str:
        return f"{describe(session, node[0]).name} {node[1].value}"

    path = [candidate]
    seen: set[int | None] = set()

    def search(node: tuple[int, RecordAction]) -> bool:
        if node == start:
            return True
        for sequence in edges.get(node, []):
            if sequence.id in seen:
                continue
            seen.add(sequence.id)
            path.append(sequence)
            target = (sequence.target_entity_id, RecordAction(sequence.target_action))
            if search(target):
                return True
            path.pop()
        return False

    first = (candidate.target_entity_id, RecordAction(candidate.target_action))
    seen.add(candidate.id)
    if not search(first):
        return []
    steps = [label(start)] + [
        label((s.target_entity_id, RecordAction(s.target_action))) for s in path
    ]
    names = ", ".join(f"'{s.name}'" for s in path)
    return [
        f"this sequence can start a cycle: {' -> '.join(steps)} (through {names}); "
        f"each sequence runs once per record and a cascade stops at depth "
        f"{engine.MAX_DEPTH}"
    ]


def save_sequence(
    session: Session,
    data: SequenceIn,
    *,
    sequence_id: int | None = None,
    commit: bool = True,
) -> SaveResult:
    """Validate and save a new sequence, or replace the one with ``sequence_id``.

    :raises ValidationError: naming the field at fault; nothing is saved.
    """
    built = to_model(session, data)
    subject = f"sequence '{built.name}'"
    clash = session.scalars(select(Sequence).where(Sequence.name == built.name)).first()
    if clash is not None and clash.id != sequence_id:
        raise ValidationError(subject, "name", "another sequence has this name")
    if sequence_id is None:
        sequence = built
    else:
        sequence = _get(session, sequence_id)
        for name in (
            "name",
            "active",
            "trigger_entity_id",
            "trigger_action",
            "watched_property",
            "conditions",
            "match",
            "target_entity_id",
            "target_action",
            "fields",
            "reference",
        ):
            setattr(sequence, name, getattr(built, name))
        sequence.updated_at = utcnow()
    session.add(sequence)
    session.flush()
    warnings = cycle_warnings(session, sequence) if sequence.active else []
    engine.forget_sequences(session)
    if commit:
        session.commit()
    logger.info("saved sequence %s (%s)", sequence.id, sequence.name)
    return SaveResult(sequence, warnings)


def _get(session: Session, sequence_id: int) -> Sequence:
    sequence = session.get(Sequence, sequence_id)
    if sequence is None:
        raise NotFoundError("sequence", sequence_id)
    return sequence


def set_active(session: Session, sequence_id: int, active: bool) -> Sequence:
    """Switch a sequence on or off."""
    sequence = _get(session, sequence_id)
    sequence.active = active
    sequence.updated_at = utcnow()
    session.add(sequence)
    engine.forget_sequences(session)
    session.commit()
    logger.info("sequence %s %s", sequence_id, "activated" if active else "deactivated")
    return sequence


def duplicate_sequence(session: Session, sequence_id: int) -> Sequence:
    """A copy named "... (copy)", inactive so it does not run twice by surprise."""
    original = _get(session, sequence_id)
    data = SequenceIn.from_model(session, original)
    base = f"{original.name} (copy)"
    name, number = base, 2
    while session.scalars(select(Sequence.id).where(Sequence.name == name)).first():
        name, number = f"{base} {number}", number + 1
    data.name, data.active = name, False
    copy = save_sequence(session, data).sequence
    logger.info("sequence %s duplicated as %s", sequence_id, copy.id)
    return copy


def delete_sequence(session: Session, sequence_id: int) -> None:
    """Delete a sequence and its run log; its emailings stay, unlinked."""
    sequence = _get(session, sequence_id)
    session.execute(
        update(Emailing)
        .where(Emailing.sequence_id == sequence_id)
        .values(sequence_id=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        SequenceRun.__table__.delete().where(SequenceRun.sequence_id == sequence_id)
    )
    session.delete(sequence)
    engine.forget_sequences(session)
    session.commit()
    logger.info("deleted sequence %s", sequence_id)


def get_sequence(session: Session, sequence_id: int) -> Sequence:
    """The sequence with this id, or NotFoundError."""
    return _get(session, sequence_id)


def list_sequences(
    session: Session,
    *,
    group_id: int | None = None,
    entity_id: int | None = None,
    active: bool | None = None,
) -> pd.DataFrame:
    """The sequences with trigger, target, last run and run and error counts."""
    query = select(Sequence).order_by(Sequence.name)
    if active is not None:
        query = query.where(Sequence.active.is_(active))
    if entity_id is not None:
        query = query.where(
            (Sequence.trigger_entity_id == entity_id)
            | (Sequence.target_entity_id == entity_id)
        )
    if group_id is not None:
        members = select(EntityGroupMember.entity_id).where(
            EntityGroupMember.group_id == group_id
        )
        query = query.where(
            Sequence.trigger_entity_id.in_(members)
            | Sequence.target_entity_id.in_(members)
        )
    stats = {
        sequence_id: (last, runs, errors)
        for sequence_id, last, runs, errors in session.execute(
            select(
                SequenceRun.sequence_id,
                func.max(SequenceRun.created_at),
                func.count(),
                func.sum((SequenceRun.outcome == RunOutcome.ERROR).cast(Integer)),
            ).group_by(SequenceRun.sequence_id)
        )
    }
    rows = []
    for sequence in session.scalars(query):
        trigger = describe(session, sequence.trigger_entity_id)
        target = describe(session, sequence.target_entity_id)
        watch = f" ({sequence.watched_property})" if sequence.watched_property else ""
        last, runs, errors = stats.get(sequence.id, (None, 0, 0))
        rows.append(
            {
                "id": sequence.id,
                "name": sequence.name,
                "active": sequence.active,
                "trigger": f"{trigger.label} · {sequence.trigger_action.value}{watch}",
                "target": f"{target.label} · {sequence.target_action.value}",
                "conditions": len(sequence.conditions or []),
                "last_run": _aware(last),
                "runs": int(runs or 0),
                "errors": int(errors or 0),
                "trigger_entity_id": sequence.trigger_entity_id,
                "target_entity_id": sequence.target_entity_id,
            }
        )
    columns = [
        "id",
        "name",
        "active",
        "trigger",
        "target",
        "conditions",
        "last_run",
        "runs",
        "errors",
        "trigger_entity_id",
        "target_entity_id",
    ]
    return pd.DataFrame(rows, columns=columns)


def _aware(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None
