"""The run log: what each sequence did on each event, for the Activity page."""

from __future__ import annotations

import pandas as pd
from sqlalchemy import select
from sqlmodel import Session

from sequencer.enums import RecordAction, RunOutcome
from sequencer.models import Entity, Event, Sequence, SequenceRun


def list_runs(
    session: Session,
    *,
    outcome: RunOutcome | str | None = None,
    sequence_id: int | None = None,
    limit: int = 500,
) -> pd.DataFrame:
    """The run log, errors first then newest first, with the event each ran on."""
    query = (
        select(SequenceRun, Sequence.name, Event, Entity.name)
        .join(Sequence, Sequence.id == SequenceRun.sequence_id)
        .join(Event, Event.id == SequenceRun.event_id)
        .join(Entity, Entity.id == Event.entity_id)
    )
    if outcome:
        query = query.where(SequenceRun.outcome == RunOutcome(outcome))
    if sequence_id is not None:
        query = query.where(SequenceRun.sequence_id == sequence_id)
    is_error = (SequenceRun.outcome == RunOutcome.ERROR).desc()
    query = query.order_by(
        is_error, SequenceRun.created_at.desc(), SequenceRun.id.desc()
    )
    rows = []
    for run, name, event, entity_name in session.execute(query.limit(limit)):
        rows.append(
            {
                "id": run.id,
                "time": run.created_at,
                "sequence_id": run.sequence_id,
                "sequence": name,
                "event_id": event.id,
                "entity": entity_name,
                "record_id": event.record_id,
                "action": RecordAction(event.action).value,
                "changed": ", ".join(event.changed or []),
                "outcome": RunOutcome(run.outcome).value,
                "message": run.message,
                "records": ", ".join(
                    f"{r['entity']}/{r['id']}" for r in run.records or []
                ),
                "duration_ms": run.duration_ms,
                "depth": event.depth,
            }
        )
    columns = [
        "id",
        "time",
        "sequence_id",
        "sequence",
        "event_id",
        "entity",
        "record_id",
        "action",
        "changed",
        "outcome",
        "message",
        "records",
        "duration_ms",
        "depth",
    ]
    return pd.DataFrame(rows, columns=columns)
