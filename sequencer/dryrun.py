"""Dry run: what a sequence would do on a record, without writing anything.

The sequence form's Preview shows it: each condition's result and the
rendered fields, validated as the real action would validate them, then
rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import Session

from sequencer import records
from sequencer.conditions import evaluate
from sequencer.engine import SequenceSpec, spec_of, targets_of, trigger_context
from sequencer.enums import Match, RecordAction
from sequencer.exceptions import NotFoundError, ValidationError
from sequencer.models import Event, Sequence
from sequencer.templating import render
from sequencer.timeutil import as_utc, utcnow


@dataclass
class ConditionResult:
    """One condition of a dry run."""

    condition: str
    result: bool


@dataclass
class DryRun:
    """What a sequence would do on a record, computed without writing anything."""

    conditions: list[ConditionResult]
    fields: dict[str, str]
    reference: str | None
    would_run: bool
    errors: list[str]
    targets: list[int] = field(default_factory=list)
    """For an Update action: the ids of the records it would change."""


def dry_run(
    session: Session,
    sequence: Sequence | Any,
    record_id: int,
    *,
    now: datetime | None = None,
) -> DryRun:
    """Evaluate a sequence (saved or a ``SequenceIn`` being edited) on a record.

    The record is treated as just created for a Create trigger, or as just
    updated with every value changed for an Update trigger.
    """
    from sequencer.sequences import SequenceIn, to_model

    now = as_utc(now) if now else utcnow()
    errors: list[str] = []
    model = (
        to_model(session, sequence) if isinstance(sequence, SequenceIn) else sequence
    )
    try:
        spec = spec_of(session, model)
    except (ValidationError, NotFoundError) as exc:
        return DryRun([], {}, None, False, [str(exc)])
    record = records.get_record(session, spec.trigger, record_id)
    new = records.record_json(spec.trigger, record)
    old = {} if spec.trigger_action is RecordAction.UPDATE else None
    results = [
        ConditionResult(rule.describe(), evaluate(rule, old, new, now=now))
        for rule in spec.conditions
    ]
    flags = [item.result for item in results]
    holds = not flags or (all(flags) if spec.match is Match.ALL else any(flags))
    context = trigger_context(spec, new)
    rendered: dict[str, str] = {}
    for name, template in spec.fields.items():
        try:
            rendered[name] = render(
                template, context, html=name == "html", subject=spec.subject, field=name
            )
        except ValidationError as exc:
            errors.append(str(exc))
    reference = None
    try:
        if spec.reference:
            reference = render(
                spec.reference,
                context,
                html=False,
                subject=spec.subject,
                field="reference",
            )
        elif spec.target_action is RecordAction.CREATE:
            reference = f"{spec.trigger.name}/{record_id}"
    except ValidationError as exc:
        errors.append(str(exc))
    targets: list[int] = []
    if not errors:
        errors += _dry_validate(
            session, spec, rendered, reference, record_id, now, targets
        )
    return DryRun(results, rendered, reference, holds and not errors, errors, targets)


def _dry_validate(
    session: Session,
    spec: SequenceSpec,
    rendered: dict[str, str],
    reference: str | None,
    record_id: int,
    now: datetime,
    targets: list[int],
) -> list[str]:
    """Validate the rendered fields as the action would, then undo everything."""
    values = {
        name: (None if value == "" else value) for name, value in rendered.items()
    }
    try:
        with session.no_autoflush:
            if spec.target_action is RecordAction.CREATE:
                records.prepare_create(
                    session, spec.target, values, reference=reference, now=now
                )
                return []
            fake = Event(
                entity_id=spec.trigger.id,
                record_id=record_id,
                action=RecordAction.UPDATE,
            )
            for row in targets_of(session, spec, fake, reference):
                targets.append(row.id)
                records.prepare_update(session, spec.target, row, values, now=now)
    except (ValidationError, NotFoundError) as exc:
        return [str(exc)]
    finally:
        # Nothing a dry run staged may reach the database.
        session.rollback()
    return []
