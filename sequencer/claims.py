"""Claims and outcomes: the database is the queue that senders share.

Every step is an atomic row update, so any number of workers (threads,
processes, machines) can share the work without sending anyone two messages:

1. A due emailing is claimed by a conditional ``UPDATE`` (pending -> sending);
   the same transaction writes one queued delivery row per recipient and sets
   ``total``.
2. Senders claim deliveries in batches: ``UPDATE ... WHERE id IN (SELECT ...
   FOR UPDATE SKIP LOCKED) RETURNING`` on PostgreSQL; on SQLite the same
   ``UPDATE`` is atomic because SQLite has one writer at a time. Claimed rows
   are ``claimed``; a sender moves a small *window* of them to ``sending``
   before it tries them, in the transaction that commits the window before.
   So a worker killed mid-batch leaves only its window's rows to be marked
   interrupted (they may have gone out); the rest were never tried and go
   back to the queue.
3. Each outcome (sent, bounced, retry, failed) is committed with its counter,
   so ``total``, ``sent`` and ``bounce`` equal the row counts at every moment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    Engine,
    String,
    bindparam,
    case,
    cast,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Update
from sqlmodel import Session

from sequencer import tracking
from sequencer.enums import (
    DeliveryStatus,
    EmailingStatus,
)
from sequencer.exceptions import SendError
from sequencer.message import Draft
from sequencer.models import Contact, Delivery, Emailing
from sequencer.recipients import resolve_recipients
from sequencer.timeutil import UTCDateTime

logger = logging.getLogger(__name__)

RETRY_BASE = timedelta(minutes=1)
"""Wait before the first retry of a temporary failure; doubled each time."""
RETRY_MAX = timedelta(hours=1)
SERVER_DOWN_WAIT = timedelta(seconds=30)
"""How long deliveries wait when the server could not be reached at all."""
NO_RECIPIENT_NOTE = (
    "No recipient: no subscribed contact matches the contact lists and the tag "
    "filter, so nothing was sent."
)
NO_LIST_NOTE = (
    "No recipient: no contact list is selected and 'all contacts' is off, so "
    "nothing was sent."
)
UNCERTAIN_NOTE = "not resent, since it may have gone out"
INTERRUPTED_REPLY = f"its worker stopped while sending; {UNCERTAIN_NOTE}"

S = DeliveryStatus
E = EmailingStatus

_sqlite_writer = threading.Lock()

Bind = Engine | Connection
"""Where delivery outcomes are written: an engine, or a send loop's connection."""


@contextmanager
def writing(bind: Bind) -> Iterator[Connection]:
    """A write transaction; on SQLite, one thread of this process at a time.

    SQLite has a single writer. Threads that collide wait in SQLite's busy
    handler, which sleeps in steps of milliseconds; queueing them on a lock
    here hands the database over at once. ``bind`` is an engine, or a
    connection a send loop keeps for its many short transactions.
    """
    lock = _sqlite_writer if bind.dialect.name == "sqlite" else nullcontext()
    with lock:
        if isinstance(bind, Connection):
            with bind.begin():
                yield bind
        else:
            with bind.begin() as connection:
                yield connection


# --- Emailing claims ----------------------------------------------------------


def claim_emailing(
    engine: Engine, emailing_id: int, *, worker_id: str, now: datetime
) -> bool:
    """Claim one due emailing and resolve its recipients, in one transaction.

    Returns False when another worker claimed it first (or it is no longer
    pending). An emailing that cannot be sent at all ends ``failed``; one with
    no recipient ends ``sent`` with ``total`` 0 and a note saying why.
    """
    with Session(engine, expire_on_commit=False) as session:
        claimed = session.execute(
            update(Emailing)
            .where(
                Emailing.id == emailing_id,
                Emailing.status == E.PENDING,
                Emailing.send_at <= now,
            )
            .values(
                status=E.SENDING,
                claimed_by=worker_id,
                claimed_at=now,
                started_at=now,
                updated_at=now,
            )
        )
        if claimed.rowcount != 1:
            session.rollback()
            return False
        emailing = session.get_one(Emailing, emailing_id)

        # An emailing that cannot produce a message fails before any recipient.
        try:
            Draft.from_emailing(emailing)
        except SendError as exc:
            emailing.status = E.FAILED
            emailing.note = str(exc)[:2000]
            emailing.finished_at = now
            session.add(emailing)
            session.commit()
            logger.warning("emailing %s failed: %s", emailing_id, exc)
            return True

        total = resolve_recipients(session, emailing, now=now)
        if total == 0:
            emailing.status = E.SENT
            emailing.finished_at = now
            listless = not emailing.all_contacts and not emailing.contact_lists
            emailing.note = NO_LIST_NOTE if listless else NO_RECIPIENT_NOTE
            session.add(emailing)
        session.commit()
    logger.info(
        "emailing %s claimed by worker %s: %s recipients", emailing_id, worker_id, total
    )
    return True


def claim_due(engine: Engine, *, worker_id: str, now: datetime) -> int:
    with Session(engine) as session:
        due = session.scalars(
            select(Emailing.id)
            .where(Emailing.status == E.PENDING, Emailing.send_at <= now)
            .order_by(Emailing.send_at, Emailing.id)
        ).all()
    return sum(
        claim_emailing(engine, emailing_id, worker_id=worker_id, now=now)
        for emailing_id in due
    )


def sending_ids(engine: Engine) -> list[int]:
    with Session(engine) as session:
        return list(
            session.scalars(
                select(Emailing.id)
                .where(Emailing.status == E.SENDING, Emailing.recipients_resolved)
                .order_by(Emailing.id)
            )
        )


# --- Delivery claims and outcomes ----------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A delivery claimed for sending, with what its message needs of the contact."""

    id: int
    contact_id: int | None
    email: str
    attempts: int
    """The attempts once this one is made (the window counts it)."""
    name: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)


def claim_batch(
    bind: Bind,
    emailing_id: int,
    *,
    worker_id: str,
    now: datetime,
    size: int,
    window: int | None = None,
) -> list[Claimed]:
    """Claim up to ``size`` queued deliveries of a sending emailing, atomically.

    The first ``window`` of them (all, by default) are opened for sending in
    the same transaction (see ``open_window``); their contacts' names and
    attributes are read in it too. Nothing is claimed once the emailing left
    ``sending`` (cancelled): that is how a cancel stops a send.
    """
    params = {
        "b_emailing": emailing_id,
        "b_worker": worker_id,
        "b_now": now,
        "b_size": size,
    }
    statement = _claim_statement(postgres=bind.dialect.name == "postgresql")
    with writing(bind) as connection:
        rows = connection.execute(statement, params).all()
        ids = sorted(row.id for row in rows)
        _open(connection, emailing_id, ids[:window], worker_id=worker_id, now=now)
        wanted = [row.contact_id for row in rows if row.contact_id is not None]
        contacts = {
            contact.id: contact
            for contact in connection.execute(_CONTACTS, {"b_ids": wanted})
        }
    claimed = []
    for row in sorted(rows, key=lambda row: row.id):
        contact = contacts.get(row.contact_id)
        claimed.append(
            Claimed(
                id=row.id,
                contact_id=row.contact_id,
                email=row.email,
                attempts=row.attempts + 1,
                name=(contact.name if contact else None) or "",
                attributes=(contact.attributes if contact else None) or {},
            )
        )
    return claimed


@lru_cache(maxsize=2)
def _claim_statement(*, postgres: bool) -> Update:
    """The claim of ``claim_batch``, built once: SQLAlchemy compiles it once."""
    emailing_id = bindparam("b_emailing")
    now = bindparam("b_now", type_=UTCDateTime)
    candidates = (
        select(Delivery.id)
        .where(
            Delivery.emailing_id == emailing_id,
            Delivery.status == S.QUEUED,
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
            exists().where(Emailing.id == emailing_id, Emailing.status == E.SENDING),
        )
        # The order of the claim index: the first rows found are the ones taken.
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(bindparam("b_size"))
    )
    if postgres:
        # Locked once in a materialised CTE: as an IN subquery the planner may
        # rescan it and claim more rows than the batch holds.
        locked = (
            candidates.with_for_update(skip_locked=True, of=Delivery)
            .cte("candidates")
            .prefix_with("MATERIALIZED")
        )
        chosen = Delivery.id == locked.c.id
    else:
        # SQLite has one writer at a time: the statement itself is the lock.
        chosen = Delivery.id.in_(candidates)
    return (
        update(Delivery)
        .where(chosen, Delivery.status == S.QUEUED)
        .values(
            status=S.CLAIMED,
            claimed_by=bindparam("b_worker"),
            claimed_at=now,
            updated_at=now,
        )
        .returning(Delivery.id, Delivery.contact_id, Delivery.email, Delivery.attempts)
    )


_OPEN = (
    update(Delivery)
    .where(
        Delivery.id.in_(bindparam("b_ids", expanding=True)),
        Delivery.claimed_by == bindparam("b_worker"),
        Delivery.status == S.CLAIMED,
        exists().where(
            Emailing.id == bindparam("b_emailing"), Emailing.status == E.SENDING
        ),
    )
    .values(
        status=S.SENDING,
        attempts=Delivery.attempts + 1,
        claimed_at=bindparam("b_now", type_=UTCDateTime),
        updated_at=bindparam("b_now", type_=UTCDateTime),
    )
    .returning(Delivery.id)
)


def _open(
    connection: Connection,
    emailing_id: int,
    ids: list[int],
    *,
    worker_id: str,
    now: datetime,
) -> set[int]:
    """Move claimed rows of this worker to ``sending``; return those moved.

    A row another worker took back (this one looked dead) or of an emailing
    cancelled meanwhile is not moved, and is not to be sent.
    """
    if not ids:
        return set()
    params = {
        "b_ids": ids,
        "b_worker": worker_id,
        "b_emailing": emailing_id,
        "b_now": now,
    }
    return set(connection.execute(_OPEN, params).scalars())


def open_window(
    bind: Bind,
    emailing_id: int,
    ids: list[int],
    *,
    worker_id: str,
    now: datetime,
    accepted: list[int] | None = None,
    reply: str = "",
    message_id: tuple[str, str] = ("", ""),
) -> tuple[int, set[int]]:
    """Open the next window of a batch, committing the window before with it.

    ``accepted`` are the deliveries the server took since the last commit
    (see ``record_sent``). One transaction for both: the rows a crash can
    leave in doubt are never more than one window. Returns how many were
    settled as sent and which of ``ids`` may now be sent.
    """
    with writing(bind) as connection:
        settled = _settle_sent(
            connection,
            emailing_id,
            accepted or [],
            worker_id=worker_id,
            now=now,
            reply=reply,
            message_id=message_id,
        )
        opened = _open(connection, emailing_id, ids, worker_id=worker_id, now=now)
    return settled, opened


_CONTACTS = select(Contact.id, Contact.name, Contact.attributes).where(
    Contact.id.in_(bindparam("b_ids", expanding=True))
)


def record_sent(
    bind: Bind,
    emailing_id: int,
    delivery_ids: list[int],
    *,
    worker_id: str,
    now: datetime,
    reply: str,
    message_id: tuple[str, str],
) -> int:
    """Commit accepted messages: their deliveries and ``sent`` move together.

    A sender commits what the server accepted once per window (see
    ``open_window``), one transaction per group instead of per message. The
    counter is raised by exactly the rows that changed, in the same
    transaction, so ``sent`` equals the sent rows whenever anyone looks.
    ``message_id`` is the text before and after the delivery id in the
    Message-ID of each message.
    """
    settled, _opened = open_window(
        bind,
        emailing_id,
        [],
        worker_id=worker_id,
        now=now,
        accepted=delivery_ids,
        reply=reply,
        message_id=message_id,
    )
    return settled


def _settle_sent(
    connection: Connection,
    emailing_id: int,
    delivery_ids: list[int],
    *,
    worker_id: str,
    now: datetime,
    reply: str,
    message_id: tuple[str, str],
) -> int:
    if not delivery_ids:
        return 0
    before, after = message_id
    params = {
        "b_ids": delivery_ids,
        "b_worker": worker_id,
        "b_now": now,
        "b_reply": reply[:2000],
        "b_before": before,
        "b_after": after,
        "b_emailing": emailing_id,
    }
    settled = connection.execute(_MARK_SENT, params).rowcount
    if settled:
        connection.execute(_COUNT_SENT, {**params, "b_count": settled})
    return settled


_NOW = bindparam("b_now", type_=UTCDateTime)
_MARK_SENT = (
    update(Delivery)
    .where(
        Delivery.id.in_(bindparam("b_ids", expanding=True)),
        Delivery.claimed_by == bindparam("b_worker"),
        Delivery.status.in_([S.SENDING, S.INTERRUPTED]),
    )
    .values(
        status=S.SENT,
        sent_at=_NOW,
        smtp_reply=bindparam("b_reply"),
        message_id=bindparam("b_before")
        + cast(Delivery.id, String)
        + bindparam("b_after"),
        next_attempt_at=None,
        updated_at=_NOW,
    )
)
"""Built once: a statement SQLAlchemy has compiled before runs at once."""
_COUNT_SENT = (
    update(Emailing)
    .where(Emailing.id == bindparam("b_emailing"))
    .values(
        sent=Emailing.sent + bindparam("b_count"),
        claimed_by=bindparam("b_worker"),
        claimed_at=_NOW,
        updated_at=_NOW,
    )
)


def _settle(
    connection: Connection,
    delivery_id: int,
    worker_id: str,
    now: datetime,
    **values: Any,
) -> bool:
    """Move one of this worker's in-flight deliveries to a rarer outcome."""
    result = connection.execute(
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.claimed_by == worker_id,
            Delivery.status.in_([S.SENDING, S.INTERRUPTED]),
        )
        .values(updated_at=now, **values)
    )
    return result.rowcount == 1


def record_bounce(
    bind: Bind,
    delivery: Claimed,
    emailing_id: int,
    *,
    worker_id: str,
    now: datetime,
    reply: str,
) -> None:
    """A 5xx: the delivery bounces and the contact is never mailed again.

    The tracking module owns what a bounce means (delivery, contact, event,
    counter); it runs here in one transaction with the check that this
    worker still holds the delivery.
    """
    with writing(bind) as connection:
        held = _settle(connection, delivery.id, worker_id, now, next_attempt_at=None)
        if not held:
            return
        with Session(bind=connection) as session:
            row = session.get_one(Delivery, delivery.id)
            tracking.record_bounce(session, row, reply, now=now)
            session.flush()


def record_failure(
    bind: Bind,
    delivery: Claimed,
    emailing_id: int,
    *,
    worker_id: str,
    now: datetime,
    reply: str,
    max_attempts: int,
    retry: bool = True,
) -> bool:
    """A temporary failure: retry later with backoff, or fail for good.

    Returns True when the delivery will be retried.
    """
    will_retry = retry and delivery.attempts < max_attempts
    if will_retry:
        wait = min(RETRY_BASE * 2 ** (delivery.attempts - 1), RETRY_MAX)
        values: dict[str, Any] = {
            "status": S.QUEUED,
            "next_attempt_at": now + wait,
            "claimed_by": None,
        }
    else:
        values = {"status": S.FAILED, "next_attempt_at": None}
    with writing(bind) as connection:
        _settle(
            connection, delivery.id, worker_id, now, smtp_reply=reply[:2000], **values
        )
        if will_retry:
            skip_cancelled(connection, now=now, emailing_id=emailing_id)
    if will_retry:
        logger.info(
            "emailing %s: delivery %s to %s retried at %s: %s",
            emailing_id,
            delivery.id,
            delivery.email,
            values["next_attempt_at"].isoformat(timespec="seconds"),
            reply,
        )
    else:
        logger.warning(
            "emailing %s: delivery %s to %s failed after %s attempts: %s",
            emailing_id,
            delivery.id,
            delivery.email,
            delivery.attempts,
            reply,
        )
    return will_retry


def record_uncertain(
    bind: Bind,
    delivery: Claimed,
    emailing_id: int,
    *,
    worker_id: str,
    now: datetime,
    reply: str,
) -> None:
    """The message was handed over and no answer came: interrupted, never resent.

    The server may have accepted it before the silence; a second try is how
    one recipient gets two messages. The reply says what happened.
    """
    with writing(bind) as connection:
        _settle(
            connection,
            delivery.id,
            worker_id,
            now,
            status=S.INTERRUPTED,
            smtp_reply=f"{reply}; {UNCERTAIN_NOTE}"[:2000],
            next_attempt_at=None,
        )
    logger.warning(
        "emailing %s: delivery %s to %s interrupted, not resent: %s",
        emailing_id,
        delivery.id,
        delivery.email,
        reply,
    )


def release(
    bind: Bind,
    emailing_id: int,
    deliveries: list[Claimed],
    *,
    worker_id: str,
    now: datetime,
    reason: str,
) -> None:
    """Give claimed deliveries back untouched: the server was unreachable.

    No attempt is counted, since no recipient is at fault; they wait a little
    and the emailing resumes when the server is back.
    """
    if not deliveries:
        return
    with writing(bind) as connection:
        connection.execute(
            update(Delivery)
            .where(
                Delivery.id.in_([row.id for row in deliveries]),
                Delivery.claimed_by == worker_id,
                Delivery.status.in_([S.CLAIMED, S.SENDING]),
            )
            .values(
                status=S.QUEUED,
                attempts=case(
                    (Delivery.status == S.SENDING, Delivery.attempts - 1),
                    else_=Delivery.attempts,
                ),
                claimed_by=None,
                next_attempt_at=now + SERVER_DOWN_WAIT,
                smtp_reply=reason[:2000],
                updated_at=now,
            )
        )
        skip_cancelled(connection, now=now, emailing_id=emailing_id)


def skip_cancelled(
    connection: Connection, *, now: datetime, emailing_id: int | None = None
) -> int:
    """Skip what is queued or claimed of cancelled emailings; return how many.

    A cancel skips the queue and the claimed rows not yet tried at once (a
    sender then finds it cannot open them), but a delivery in flight at that
    moment can come back to the queue (a 4xx, an unreachable server) after
    the cancel: it is skipped too, and the emailing's note counts it. Runs
    in the caller's transaction, for one emailing or, from a pass's clean-up,
    for all.
    """
    cancelled = select(Emailing.id).where(Emailing.status == E.CANCELLED)
    if emailing_id is not None:
        cancelled = cancelled.where(Emailing.id == emailing_id)
    touched = connection.execute(
        update(Delivery)
        .where(
            Delivery.emailing_id.in_(cancelled),
            Delivery.status.in_([S.QUEUED, S.CLAIMED]),
        )
        .values(status=S.SKIPPED, next_attempt_at=None, updated_at=now)
        .returning(Delivery.emailing_id)
    ).scalars()
    emailing_ids = sorted(set(touched))
    for touched_id in emailing_ids:
        skipped = connection.scalar(
            select(func.count()).where(
                Delivery.emailing_id == touched_id, Delivery.status == S.SKIPPED
            )
        )
        connection.execute(
            update(Emailing)
            .where(Emailing.id == touched_id)
            .values(note=f"Cancelled: {skipped} recipients skipped.")
        )
        logger.info("emailing %s cancelled: %s deliveries skipped", touched_id, skipped)
    return len(emailing_ids)


def finish_if_done(bind: Bind, emailing_id: int, *, now: datetime) -> bool:
    """Mark a sending emailing sent once no delivery is queued or in flight."""
    unfinished = exists().where(
        Delivery.emailing_id == emailing_id,
        Delivery.status.in_([S.QUEUED, S.CLAIMED, S.SENDING]),
    )
    with writing(bind) as connection:
        done = connection.execute(
            update(Emailing)
            .where(
                Emailing.id == emailing_id,
                Emailing.status == E.SENDING,
                Emailing.recipients_resolved,
                ~unfinished,
            )
            .values(status=E.SENT, finished_at=now, updated_at=now)
        )
        if done.rowcount != 1:
            return False
        counts = dict(
            connection.execute(
                select(Delivery.status, func.count())
                .where(Delivery.emailing_id == emailing_id)
                .group_by(Delivery.status)
            ).all()
        )
        note = _summary(counts)
        # Interrupted deliveries may have gone out: that is not a failure.
        reached = (S.SENT, S.BOUNCED, S.INTERRUPTED)
        everything_failed = counts and not any(counts.get(s) for s in reached)
        connection.execute(
            update(Emailing)
            .where(Emailing.id == emailing_id)
            .values(note=note, status=E.FAILED if everything_failed else E.SENT)
        )
    logger.info("emailing %s finished: %s", emailing_id, note)
    return True


def _summary(counts: dict[Any, int]) -> str:
    parts = [
        f"{counts[status]} {status.value}"
        for status in (S.SENT, S.BOUNCED, S.FAILED, S.INTERRUPTED, S.SKIPPED)
        if counts.get(status)
    ]
    return ", ".join(parts) or "nothing to send"
