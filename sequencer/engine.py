"""The sequence engine: runs the sequences each record event triggers.

Events come from the outbox (``records``). Each is claimed atomically, so two
workers never process one event at once; a run row is unique per (sequence,
event) and commits together with the records its action wrote, so a sequence
runs at most once per event even when a stale claim is taken over.

Loops are bounded two ways: a sequence never runs twice for the same record in
one cascade (``Event.visited``), and a cascade stops at depth ``MAX_DEPTH`` with
an error in the run log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from sequencer import adapters, records
from sequencer.conditions import Condition, build, evaluate
from sequencer.config import get_settings
from sequencer.db import get_engine, is_postgres
from sequencer.entities import EntityInfo, describe
from sequencer.enums import EventStatus, Match, PropertyType, RecordAction, RunOutcome
from sequencer.exceptions import NotFoundError, SequencerError, ValidationError
from sequencer.models import Event, Record, Sequence, SequenceRun
from sequencer.records import Cascade, PendingWrite, RunSummary
from sequencer.templating import render
from sequencer.timeutil import as_utc, utcnow
from sequencer.types import from_json

logger = logging.getLogger(__name__)

MAX_DEPTH = 5
"""Sequence actions allowed between a user's write and the last event."""
CLAIM_BATCH = 200
_CACHE_KEY = "sequencer.sequences"


@dataclass(frozen=True)
class SequenceSpec:
    """An active sequence, read once per session and checked for running."""

    id: int
    name: str
    trigger: EntityInfo
    trigger_action: RecordAction
    watched_property: str | None
    conditions: tuple[Condition, ...]
    match: Match
    target: EntityInfo
    target_action: RecordAction
    fields: dict[str, str]
    reference: str | None

    @property
    def subject(self) -> str:
        return f"sequence '{self.name}'"


def spec_of(session: Session, sequence: Sequence) -> SequenceSpec:
    """Check a sequence against the registry and freeze it for running."""
    trigger = describe(session, sequence.trigger_entity_id)
    subject = f"sequence '{sequence.name}'"
    conditions = tuple(
        build(rule, trigger, subject=subject, index=number)
        for number, rule in enumerate(sequence.conditions or [], start=1)
    )
    return SequenceSpec(
        id=sequence.id,
        name=sequence.name,
        trigger=trigger,
        trigger_action=RecordAction(sequence.trigger_action),
        watched_property=sequence.watched_property or None,
        conditions=conditions,
        match=Match(sequence.match),
        target=describe(session, sequence.target_entity_id),
        target_action=RecordAction(sequence.target_action),
        fields=dict(sequence.fields or {}),
        reference=sequence.reference or None,
    )


def forget_sequences(session: Session) -> None:
    """Drop the session's cache of active sequences after a sequence changes."""
    session.info.pop(_CACHE_KEY, None)


def sequences_for(
    session: Session, entity_id: int, action: RecordAction
) -> list[SequenceSpec | tuple[Sequence, Exception]]:
    """The active sequences a write of this kind triggers, oldest first.

    A sequence that no longer fits its entities (a property was deleted) comes
    back as ``(sequence, error)`` so its runs are logged as errors.
    """
    cache = session.info.get(_CACHE_KEY)
    if cache is None:
        cache = {}
        active = session.scalars(
            select(Sequence).where(Sequence.active.is_(True)).order_by(Sequence.id)
        )
        for sequence in active:
            key = (sequence.trigger_entity_id, RecordAction(sequence.trigger_action))
            try:
                item: Any = spec_of(session, sequence)
            except (SequencerError, LookupError) as exc:
                item = (sequence, exc)
            cache.setdefault(key, []).append(item)
        session.info[_CACHE_KEY] = cache
    return cache.get((entity_id, RecordAction(action)), [])


def event_status(
    session: Session, *, claim: bool
) -> Callable[[int, RecordAction], EventStatus]:
    """How a new event starts: done at once when no sequence listens to it."""

    def status(entity_id: int, action: RecordAction) -> EventStatus:
        if not sequences_for(session, entity_id, action):
            return EventStatus.PROCESSED
        return EventStatus.PROCESSING if claim else EventStatus.PENDING

    return status


# --- Running -------------------------------------------------------------------


class _Retry(Exception):
    """The batch hit a conflict: redo it one run per transaction."""


@dataclass
class _Staged:
    """A run decided but not yet stored: its row waits for its records' ids."""

    spec_id: int
    name: str
    event_id: int
    outcome: RunOutcome
    message: str
    duration_ms: float
    writes: list[PendingWrite] = field(default_factory=list)


@dataclass
class _Pass:
    """One pass over a set of claimed events, with everything it decided."""

    session: Session
    now: datetime
    worker_id: str
    careful: bool
    collect: bool = True
    """Keep a summary of skipped runs too (an import only counts the others)."""
    staged: list[_Staged] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    """Run rows ready to insert: those that wrote nothing."""
    summaries: list[RunSummary] = field(default_factory=list)

    stamp: datetime = field(init=False)
    """``now`` as the run rows store it: naive UTC."""

    def __post_init__(self) -> None:
        self.stamp = self.now.astimezone(UTC).replace(tzinfo=None)

    def log(
        self,
        spec_id: int,
        name: str,
        event_id: int,
        outcome: RunOutcome,
        message: str,
        duration_ms: float,
    ) -> None:
        """Keep a run that wrote nothing, ready for the batch insert."""
        message = message[:4000]
        self.rows.append(
            (spec_id, event_id, outcome.value, message, "[]", duration_ms, self.stamp)
        )
        if self.collect or outcome is not RunOutcome.SKIPPED:
            self.summaries.append(
                RunSummary(spec_id, name, event_id, outcome, message, [])
            )


def run_events(
    session: Session,
    events: list[int] | list[records.EventRow],
    *,
    now: datetime | None = None,
    worker_id: str | None = None,
    taken_over: bool = False,
    collect: bool = True,
) -> list[RunSummary]:
    """Run the sequences of events this process has claimed, and their cascades.

    All runs commit in one transaction when nothing goes wrong; a conflict (a
    database error, or an action that failed after staging part of its
    writes) rolls that back and redoes each run in a transaction of its own,
    skipping runs that exist.

    :param taken_over: the events were claimed from the outbox, possibly from a
        dead worker, so runs that already exist are skipped.
    :param collect: also return the runs skipped by their conditions.
    """
    if not events:
        return []
    now = as_utc(now) if now else utcnow()
    worker_id = worker_id or get_settings().worker_id
    event_ids = [e if isinstance(e, int) else e.id for e in events]
    state = _Pass(session, now, worker_id, careful=False, collect=collect)
    try:
        loaded = [e for e in events if not isinstance(e, int)]
        _run_batch(state, loaded or _load(session, event_ids), taken_over=taken_over)
        session.commit()
        return state.summaries
    except (_Retry, DBAPIError) as exc:
        session.rollback()
        logger.warning("events %s: %s; retrying one run at a time", event_ids, exc)
    state = _Pass(session, now, worker_id, careful=True, collect=collect)
    for event_id in event_ids:
        _run_careful(state, event_id)
    return state.summaries


def _load(session: Session, event_ids: list[int]) -> list[Event]:
    query = select(Event).where(Event.id.in_(event_ids)).order_by(Event.id)
    return [
        event
        for event in session.scalars(query)
        if event.status is not EventStatus.PROCESSED
    ]


def _run_batch(state: _Pass, events: list[Any], *, taken_over: bool) -> None:
    """Run level by level: the events, then the events their actions fired."""
    event_ids = [event.id for event in events]
    session = state.session
    done: dict[int, set[int]] = {}
    if taken_over:
        existing = select(SequenceRun.event_id, SequenceRun.sequence_id).where(
            SequenceRun.event_id.in_(event_ids)
        )
        for event_id, sequence_id in session.execute(existing):
            done.setdefault(event_id, set()).add(sequence_id)
    level: list[Any] = list(events)
    processed: list[int] = []
    while level:
        for event in level:
            for item in sequences_for(session, event.entity_id, event.action):
                _run_one(state, event, item, done.get(event.id, set()))
        processed += [event.id for event in level]
        level = _store(state)
    _mark_processed(session, processed, state.now)


def _store(state: _Pass) -> list[Any]:
    """Write the staged runs with their records; returns the events to run next."""
    session = state.session
    status_for = event_status(session, claim=True)
    children: list[Any] = []
    writes = [write for staged in state.staged for write in staged.writes]
    records.finish_writes(
        session, writes, now=state.now, status_for=status_for, worker_id=state.worker_id
    )
    rows = state.rows
    created_at = state.stamp
    for staged in state.staged:
        written = [
            {"entity": w.entity.name, "id": w.row.id, "action": w.action.value}
            for w in staged.writes
        ]
        message = staged.message
        if staged.outcome is RunOutcome.DONE:
            message = ", ".join(
                f"{w['action']}d {w['entity']} {w['id']}" for w in written
            )
            logger.info(
                "sequence %s ran on event %s: %s",
                staged.spec_id,
                staged.event_id,
                message,
            )
        rows.append(
            (
                staged.spec_id,
                staged.event_id,
                staged.outcome.value,
                message[:4000],
                json.dumps(written) if written else "[]",
                staged.duration_ms,
                created_at,
            )
        )
        state.summaries.append(
            RunSummary(
                staged.spec_id,
                staged.name,
                staged.event_id,
                staged.outcome,
                message,
                written,
            )
        )
        children += [
            w.event
            for w in staged.writes
            if w.event is not None and w.event.status is EventStatus.PROCESSING
        ]
    _insert_runs(session, rows)
    state.staged, state.rows = [], []
    return children


def _insert_runs(session: Session, rows: list[tuple[Any, ...]]) -> None:
    """Insert run rows with the driver's own executemany.

    An import logs a run per sequence and row (100,000 for 10,000 rows and ten
    sequences); SQLAlchemy's per-value processing would double the cost of
    the insert, so the values are prepared here: JSON text and naive UTC.
    """
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.paramstyle == "qmark":
        marks = "?, ?, ?, ?, ?, ?, ?"
    else:
        marks = "%s, %s, %s, %s, %s::json, %s, %s"
    connection.exec_driver_sql(
        "INSERT INTO sequencerun (sequence_id, event_id, outcome, message, "
        f"records, duration_ms, created_at) VALUES ({marks})",
        rows,
    )


def _mark_processed(session: Session, event_ids: list[int], now: datetime) -> None:
    if not event_ids:
        return
    session.execute(
        update(Event)
        .where(Event.id.in_(event_ids))
        .values(status=EventStatus.PROCESSED, processed_at=now)
        .execution_options(synchronize_session=False)
    )


def _run_careful(state: _Pass, event_id: int) -> None:
    """Process one event and its cascade, one transaction per sequence run."""
    session = state.session
    queue: list[int] = [event_id]
    while queue:
        current = queue.pop(0)
        (event,) = _load(session, [current]) or (None,)
        if event is None:
            continue
        for item in sequences_for(session, event.entity_id, event.action):
            if _item_id(item) in _existing_runs(session, event.id):
                continue
            try:
                _run_one(state, event, item, set())
                children = _store(state)
                session.commit()
                queue += [child.id for child in children]
            except (DBAPIError, _Retry) as exc:
                session.rollback()
                state.staged, state.rows = [], []
                logger.info("sequence %s on event %s: %s", _item_id(item), current, exc)
                # The run is logged as failed: a refused write must not vanish
                # from the run log without a word.
                name = item.name if isinstance(item, SequenceSpec) else item[0].name
                reason = (
                    f"the database refused the write: {exc.orig}"
                    if isinstance(exc, DBAPIError)
                    else str(exc)
                )
                state.log(_item_id(item), name, event.id, RunOutcome.ERROR, reason, 0)
                _insert_runs(session, state.rows)
                state.rows = []
                session.commit()
        _mark_processed(session, [current], state.now)
        session.commit()


def _item_id(item: SequenceSpec | tuple[Sequence, Exception]) -> int:
    return item.id if isinstance(item, SequenceSpec) else item[0].id


def _existing_runs(session: Session, event_id: int) -> set[int]:
    query = select(SequenceRun.sequence_id).where(SequenceRun.event_id == event_id)
    return set(session.scalars(query))


def _run_one(
    state: _Pass,
    event: Any,
    item: SequenceSpec | tuple[Sequence, Exception],
    done: set[int],
) -> None:
    """Decide one sequence on one event and stage its run (and its writes)."""
    if isinstance(item, tuple):
        sequence, error = item
        state.log(
            sequence.id, sequence.name, event.id, RunOutcome.ERROR, str(error), 0.0
        )
        return
    spec = item
    if spec.id in done:
        return
    if (
        spec.watched_property
        and spec.trigger_action is RecordAction.UPDATE
        and spec.watched_property not in event.changed
    ):
        return
    started = time.perf_counter()
    outcome, message, writes = _decide(state, event, spec)
    duration = round((time.perf_counter() - started) * 1000, 3)
    if writes:
        state.staged.append(
            _Staged(spec.id, spec.name, event.id, outcome, message, duration, writes)
        )
    else:
        state.log(spec.id, spec.name, event.id, outcome, message, duration)


def _decide(
    state: _Pass, event: Any, spec: SequenceSpec
) -> tuple[RunOutcome, str, list[PendingWrite]]:
    """Check the loop guards and conditions, then stage the action's writes."""
    record_key = f"{spec.trigger.name}/{event.record_id}"
    if event.visited and f"{spec.id}:{record_key}" in event.visited:
        return RunOutcome.SKIPPED, f"already ran on {record_key} in this cascade", []
    if spec.conditions:
        old = event.old if event.action is RecordAction.UPDATE else None
        failed = [
            rule
            for rule in spec.conditions
            if not evaluate(rule, old, event.new, now=state.now)
        ]
        if failed if spec.match is Match.ALL else len(failed) == len(spec.conditions):
            reasons = "; ".join(rule.describe() for rule in failed)
            return RunOutcome.SKIPPED, f"conditions not met: {reasons}", []
    if event.depth >= MAX_DEPTH:
        root = event.root_event_id or event.id
        logger.warning("cascade of event %s stopped at depth %s", root, MAX_DEPTH)
        reason = f"cascade stopped at depth {MAX_DEPTH} (started by event {root})"
        return RunOutcome.ERROR, reason, []

    cascade = Cascade(
        root_event_id=event.root_event_id or event.id,
        depth=event.depth + 1,
        visited=(*(event.visited or []), f"{spec.id}:{record_key}"),
        sequence_id=spec.id,
    )
    try:
        writes = _act(state.session, spec, event, state.now, cascade)
    except (ValidationError, NotFoundError) as exc:
        if getattr(exc, "staged", False):
            if not state.careful:
                raise _Retry(str(exc)) from exc
            state.session.rollback()
        logger.info("sequence %s on event %s failed: %s", spec.id, event.id, exc)
        return RunOutcome.ERROR, str(exc), []
    except DBAPIError:
        raise
    except Exception as exc:
        if not state.careful:
            raise _Retry(str(exc)) from exc
        state.session.rollback()
        logger.exception("sequence %s on event %s crashed", spec.id, event.id)
        return RunOutcome.ERROR, f"internal error: {exc}", []
    if not writes:
        return RunOutcome.SKIPPED, f"no {spec.target.name} record to change", []
    for write in writes:
        write.cascade = cascade
    return RunOutcome.DONE, "", writes


def render_fields(spec: SequenceSpec, context: dict[str, Any]) -> dict[str, str]:
    """Each target field's template rendered over the trigger record."""
    return {
        name: render(
            template, context, html=name == "html", subject=spec.subject, field=name
        )
        for name, template in spec.fields.items()
    }


def trigger_context(spec: SequenceSpec, values: dict[str, Any]) -> dict[str, Any]:
    """The template variables of the trigger record, typed from an event's JSON."""
    typed = {
        name: from_json(prop.type, values.get(name))
        for name, prop in spec.trigger.properties.items()
    }
    for name in values:
        if name not in typed:
            typed[name] = values[name]
    for name in ("created_at", "updated_at"):
        typed[name] = from_json(PropertyType.DATETIME, values.get(name))
    return records.template_context(spec.trigger, typed)


def _act(
    session: Session,
    spec: SequenceSpec,
    event: Event,
    now: datetime,
    cascade: Cascade,
) -> list[PendingWrite]:
    """Stage the action's writes (validated; nothing flushed yet)."""
    context = trigger_context(spec, event.new)
    values = {
        name: (None if value == "" else value)
        for name, value in render_fields(spec, context).items()
    }
    reference = None
    if spec.reference:
        reference = render(
            spec.reference, context, html=False, subject=spec.subject, field="reference"
        ).strip()

    if spec.target_action is RecordAction.CREATE:
        if reference is None:
            reference = f"{spec.trigger.name}/{event.record_id}"
        write = records.prepare_create(
            session, spec.target, values, reference=reference, now=now, cascade=cascade
        )
        return [write]

    writes = []
    for row in targets_of(session, spec, event, reference):
        try:
            write = records.prepare_update(session, spec.target, row, values, now=now)
        except (ValidationError, NotFoundError) as exc:
            exc.staged = bool(writes)  # type: ignore[attr-defined]
            raise
        if write is not None:
            writes.append(write)
    return writes


def targets_of(
    session: Session, spec: SequenceSpec, event: Event, reference: str | None
) -> list[Any]:
    """The records an Update action changes: by reference, by id, or itself."""
    adapter = adapters.adapter_for(spec.target)
    if reference is None:
        if spec.target.id != spec.trigger.id:
            return []
        row = adapter.load(session, spec.target, event.record_id)
        return [row] if row is not None else []
    if reference == "":
        return []
    rows: list[Any] = []
    if adapter.has_reference:
        model = adapter.model
        query = select(model).where(model.reference == reference).order_by(model.id)
        if model is Record:
            query = query.where(Record.entity_id == spec.target.id)
        rows = list(session.scalars(query))
    # ASCII digits only ("²".isdigit() is true) and an id the database can hold.
    if not rows and reference.isascii() and reference.isdigit():
        number = int(reference)
        row = adapter.load(session, spec.target, number) if number < 2**63 else None
        rows = [row] if row is not None else []
    return rows


# --- Claiming pending events -------------------------------------------------------


def _claim(session: Session, worker_id: str, now: datetime, size: int) -> list[int]:
    """Atomically take up to ``size`` pending (or stale) events for this worker."""
    stale = now - timedelta(seconds=get_settings().stale_claim_seconds)
    claimable = or_(
        Event.status == EventStatus.PENDING,
        and_(Event.status == EventStatus.PROCESSING, Event.claimed_at < stale),
    )
    candidates = select(Event.id).where(claimable).order_by(Event.id).limit(size)
    if is_postgres(session):
        candidates = candidates.with_for_update(skip_locked=True)
    ids = list(session.scalars(candidates))
    if not ids:
        session.rollback()
        return []
    claimed = session.scalars(
        update(Event)
        .where(Event.id.in_(ids), claimable)
        .values(status=EventStatus.PROCESSING, claimed_by=worker_id, claimed_at=now)
        .returning(Event.id)
        .execution_options(synchronize_session=False)
    )
    result = sorted(claimed)
    session.commit()
    return result


def process_pending(
    session_or_engine: Session | Engine | None = None,
    *,
    now: datetime | None = None,
    worker_id: str | None = None,
    limit: int | None = None,
) -> int:
    """Run the sequences of every pending event (and stale claims); returns the count.

    Called by each scheduler pass; safe with any number of workers at once.
    """
    now = as_utc(now) if now else utcnow()
    worker_id = worker_id or get_settings().worker_id
    if isinstance(session_or_engine, Session):
        return _process_pending(session_or_engine, now, worker_id, limit)
    with Session(session_or_engine or get_engine(), expire_on_commit=False) as session:
        return _process_pending(session, now, worker_id, limit)


def _process_pending(
    session: Session, now: datetime, worker_id: str, limit: int | None
) -> int:
    processed = 0
    forget_sequences(session)
    while limit is None or processed < limit:
        size = CLAIM_BATCH if limit is None else min(CLAIM_BATCH, limit - processed)
        ids = _claim(session, worker_id, now, size)
        if not ids:
            break
        run_events(session, ids, now=now, worker_id=worker_id, taken_over=True)
        processed += len(ids)
        logger.info("worker %s processed %s events", worker_id, len(ids))
    return processed


def pending_count(session: Session) -> int:
    """Events waiting for a pass (shown on the Settings page)."""
    query = (
        select(func.count())
        .select_from(Event)
        .where(Event.status != EventStatus.PROCESSED)
    )
    return int(session.scalar(query) or 0)
