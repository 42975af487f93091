"""Turning due emailings into sent email, once per recipient.

Every step is a claim in the database, so any number of workers (threads,
processes, machines) can share the work without sending anyone two messages:

1. A due emailing is claimed by a conditional ``UPDATE`` (pending -> sending);
   the same transaction writes one queued delivery row per recipient and sets
   ``total``.
2. Senders claim deliveries in batches: ``UPDATE ... WHERE id IN (SELECT ...
   FOR UPDATE SKIP LOCKED) RETURNING`` on PostgreSQL; on SQLite the same
   ``UPDATE`` is atomic because SQLite has one writer at a time.
3. Each outcome (sent, bounced, retry, failed) is committed with its counter,
   so ``total``, ``sent`` and ``bounce`` equal the row counts at every moment.

A worker killed mid-send leaves its claimed deliveries in ``sending``; after
the stale timeout they become ``interrupted``, never resent, since the server
may have accepted them before the kill.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    Engine,
    String,
    and_,
    bindparam,
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
from sequencer.backends import (
    Accepted,
    Backend,
    RateLimiter,
    Refused,
    ServerUnavailable,
    get_backend,
)
from sequencer.config import Settings, get_settings
from sequencer.db import get_engine, is_postgres
from sequencer.enums import (
    DeliveryStatus,
    EmailingStatus,
)
from sequencer.exceptions import NotFoundError, SendError, ValidationError
from sequencer.message import Draft, LinkIds, Recipient, make_address
from sequencer.models import Contact, Delivery, Emailing
from sequencer.recipients import resolve_recipients
from sequencer.timeutil import UTCDateTime, utcnow

logger = logging.getLogger(__name__)

RETRY_BASE = timedelta(minutes=1)
"""Wait before the first retry of a temporary failure; doubled each time."""
RETRY_MAX = timedelta(hours=1)
SERVER_DOWN_WAIT = timedelta(seconds=30)
"""How long deliveries wait when the server could not be reached at all."""
FLUSH_EVERY = 20
"""Accepted messages a sender commits at once (or after ``FLUSH_SECONDS``).

A worker killed before a commit leaves those deliveries in flight: they are
marked interrupted, not resent, so this bounds what a crash can blur.
"""
FLUSH_SECONDS = 1.0

NO_RECIPIENT_NOTE = (
    "No recipient: no subscribed contact matches the contact lists and the tag "
    "filter, so nothing was sent."
)
NO_LIST_NOTE = (
    "No recipient: no contact list is selected and 'all contacts' is off, so "
    "nothing was sent."
)
INTERRUPTED_REPLY = (
    "its worker stopped while sending; not resent, since it may have gone out"
)

S = DeliveryStatus
E = EmailingStatus

_stop = threading.Event()


def request_stop() -> None:
    """Ask running sends to stop after their current batch (a clean shutdown)."""
    _stop.set()


def allow_sending() -> None:
    """Undo ``request_stop`` when a scheduler starts again in this process."""
    _stop.clear()


_sqlite_writer = threading.Lock()


@contextmanager
def _writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction; on SQLite, one thread of this process at a time.

    SQLite has a single writer. Threads that collide wait in SQLite's busy
    handler, which sleeps in steps of milliseconds; queueing them on a lock
    here hands the database over at once.
    """
    if engine.dialect.name != "sqlite":
        with engine.begin() as connection:
            yield connection
        return
    with _sqlite_writer, engine.begin() as connection:
        yield connection


class _Clock:
    """The pass's "now", moving forward with the real time a send takes.

    A pass reads now once (tests pass a fixed one); claims made ten minutes
    into a long send must still look fresh to other workers.
    """

    def __init__(self, now: datetime) -> None:
        self.start = now
        self._origin = time.monotonic()

    def __call__(self) -> datetime:
        return self.start + timedelta(seconds=time.monotonic() - self._origin)

    def elapsed(self) -> float:
        return time.monotonic() - self._origin


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


def _claim_due(engine: Engine, *, worker_id: str, now: datetime) -> int:
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


def _sending_ids(engine: Engine) -> list[int]:
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
    name: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)


def claim_batch(
    engine: Engine, emailing_id: int, *, worker_id: str, now: datetime, size: int
) -> list[Claimed]:
    """Claim up to ``size`` queued deliveries of a sending emailing, atomically.

    Their contacts' names and attributes are read in the same transaction.
    Nothing is claimed once the emailing left ``sending`` (cancelled): that
    is how a cancel stops a send between batches.
    """
    params = {
        "b_emailing": emailing_id,
        "b_worker": worker_id,
        "b_now": now,
        "b_size": size,
    }
    statement = _claim_statement(postgres=is_postgres(engine))
    with _writing(engine) as connection:
        rows = connection.execute(statement, params).all()
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
                attempts=row.attempts,
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
            status=S.SENDING,
            claimed_by=bindparam("b_worker"),
            claimed_at=now,
            attempts=Delivery.attempts + 1,
            updated_at=now,
        )
        .returning(Delivery.id, Delivery.contact_id, Delivery.email, Delivery.attempts)
    )


_CONTACTS = select(Contact.id, Contact.name, Contact.attributes).where(
    Contact.id.in_(bindparam("b_ids", expanding=True))
)


def record_sent(
    engine: Engine,
    emailing_id: int,
    delivery_ids: list[int],
    *,
    worker_id: str,
    now: datetime,
    reply: str,
    message_id: tuple[str, str],
) -> int:
    """Commit accepted messages: their deliveries and ``sent`` move together.

    A sender commits what the server accepted in small groups (see
    ``FLUSH_EVERY``): one transaction per group instead of per message. The
    counter is raised by exactly the rows that changed, in the same
    transaction, so ``sent`` equals the sent rows whenever anyone looks.
    ``message_id`` is the text before and after the delivery id in the
    Message-ID of each message.
    """
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
    with _writing(engine) as connection:
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
    engine: Engine,
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
    with _writing(engine) as connection:
        held = _settle(connection, delivery.id, worker_id, now, next_attempt_at=None)
        if not held:
            return
        with Session(bind=connection) as session:
            row = session.get_one(Delivery, delivery.id)
            tracking.record_bounce(session, row, reply, now=now)
            session.flush()


def record_failure(
    engine: Engine,
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
    with _writing(engine) as connection:
        _settle(
            connection, delivery.id, worker_id, now, smtp_reply=reply[:2000], **values
        )
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


def release(
    engine: Engine,
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
    with _writing(engine) as connection:
        connection.execute(
            update(Delivery)
            .where(
                Delivery.id.in_([row.id for row in deliveries]),
                Delivery.claimed_by == worker_id,
                Delivery.status == S.SENDING,
            )
            .values(
                status=S.QUEUED,
                attempts=Delivery.attempts - 1,
                claimed_by=None,
                next_attempt_at=now + SERVER_DOWN_WAIT,
                smtp_reply=reason[:2000],
                updated_at=now,
            )
        )


def finish_if_done(engine: Engine, emailing_id: int, *, now: datetime) -> bool:
    """Mark a sending emailing sent once no delivery is queued or in flight."""
    unfinished = exists().where(
        Delivery.emailing_id == emailing_id,
        Delivery.status.in_([S.QUEUED, S.SENDING]),
    )
    with _writing(engine) as connection:
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
        everything_failed = (
            counts and not counts.get(S.SENT) and not counts.get(S.BOUNCED)
        )
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


# --- The send loop ---------------------------------------------------------------


@dataclass
class _Send:
    """One dispatch: the connections of this worker sharing its sending emailings."""

    engine: Engine
    backend: Backend
    settings: Settings
    worker_id: str
    clock: _Clock
    max_seconds: float | None
    limiter: RateLimiter
    drafts: dict[int, tuple[Draft, LinkIds]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    unreachable: threading.Event = field(default_factory=threading.Event)
    accepted: int = 0

    def stopping(self) -> bool:
        out_of_time = self.max_seconds is not None and (
            self.clock.elapsed() >= self.max_seconds
        )
        return out_of_time or _stop.is_set() or self.unreachable.is_set()

    def draft(self, emailing_id: int) -> tuple[Draft, LinkIds]:
        with self.lock:
            if emailing_id not in self.drafts:
                with Session(self.engine) as session:
                    emailing = session.get_one(Emailing, emailing_id)
                self.drafts[emailing_id] = (
                    Draft.from_emailing(emailing),
                    LinkIds(self.engine, emailing_id),
                )
            return self.drafts[emailing_id]

    def run(self, emailing_ids: list[int]) -> int:
        slots = max(1, self.settings.smtp_connections)
        with ThreadPoolExecutor(slots, thread_name_prefix="sequencer-send") as pool:
            futures = [
                pool.submit(self.connection_loop, emailing_ids) for _ in range(slots)
            ]
            for future in futures:
                future.result()
        return self.accepted

    def connection_loop(self, emailing_ids: list[int]) -> None:
        """One connection: claim a batch, send it, until nothing is left."""
        connection = None
        try:
            for emailing_id in emailing_ids:
                while not self.stopping():
                    batch = claim_batch(
                        self.engine,
                        emailing_id,
                        worker_id=self.worker_id,
                        now=self.clock(),
                        size=self.settings.batch_size,
                    )
                    if not batch:
                        break
                    if connection is None:
                        connection = self.backend.connect()
                    self.send_batch(connection, emailing_id, batch)
                if self.stopping():
                    return
                finish_if_done(self.engine, emailing_id, now=self.clock())
        except Exception:
            logger.exception("worker %s: the send loop crashed", self.worker_id)
            raise
        finally:
            if connection is not None:
                connection.close()

    def send_batch(
        self, connection: Any, emailing_id: int, batch: list[Claimed]
    ) -> None:
        draft, link_ids = self.draft(emailing_id)
        accepted: list[int] = []
        flushed_at = time.monotonic()
        for position, delivery in enumerate(batch):
            try:
                self.send_one(
                    connection,
                    emailing_id,
                    draft,
                    link_ids,
                    delivery,
                    accepted,
                )
                if len(accepted) >= FLUSH_EVERY or (
                    time.monotonic() - flushed_at >= FLUSH_SECONDS
                ):
                    self.flush(emailing_id, accepted)
                    flushed_at = time.monotonic()
            except ServerUnavailable as exc:
                self.flush(emailing_id, accepted)
                # Nobody is at fault: hand the rest of the batch back untouched.
                self.unreachable.set()
                logger.warning(
                    "emailing %s: the server is unreachable, sending resumes later: %s",
                    emailing_id,
                    exc,
                )
                release(
                    self.engine,
                    batch[position:],
                    worker_id=self.worker_id,
                    now=self.clock(),
                    reason=str(exc),
                )
                return
        self.flush(emailing_id, accepted)

    def flush(self, emailing_id: int, accepted: list[int]) -> None:
        if not accepted:
            return
        draft, _link_ids = self.draft(emailing_id)
        settled = record_sent(
            self.engine,
            emailing_id,
            accepted,
            worker_id=self.worker_id,
            now=self.clock(),
            reply=self.backend.accepted_reply,
            message_id=draft.message_id_parts(),
        )
        logger.debug(
            "emailing %s: %s deliveries sent by worker %s",
            emailing_id,
            settled,
            self.worker_id,
        )
        accepted.clear()
        with self.lock:
            self.accepted += settled

    def send_one(
        self,
        connection: Any,
        emailing_id: int,
        draft: Draft,
        link_ids: LinkIds,
        delivery: Claimed,
        accepted: list[int],
    ) -> None:
        recipient = Recipient(
            email=delivery.email,
            name=delivery.name or "",
            attributes=delivery.attributes or {},
            delivery_id=delivery.id,
        )
        common = {"worker_id": self.worker_id}

        # A message that cannot be built fails at once: retrying cannot help.
        try:
            message = draft.render(recipient, link_ids=link_ids, now=self.clock())
            data = message.as_bytes()
            address = make_address("", delivery.email).addr_spec
        except (SendError, ValueError) as exc:
            record_failure(
                self.engine,
                delivery,
                emailing_id,
                now=self.clock(),
                reply=f"message not built: {exc}",
                max_attempts=self.settings.max_attempts,
                retry=False,
                **common,
            )
            return

        self.limiter.wait()
        outcome = connection.send(data, draft.sender.addr_spec, address)
        now = self.clock()
        if isinstance(outcome, Accepted):
            accepted.append(delivery.id)
        elif isinstance(outcome, Refused) and outcome.permanent:
            record_bounce(
                self.engine,
                delivery,
                emailing_id,
                now=now,
                reply=outcome.reply,
                **common,
            )
        else:
            record_failure(
                self.engine,
                delivery,
                emailing_id,
                now=now,
                reply=outcome.reply,
                max_attempts=self.settings.max_attempts,
                **common,
            )


def dispatch_due(
    *,
    now: datetime | None = None,
    worker_id: str | None = None,
    max_seconds: float | None = None,
) -> int:
    """Claim due emailings and send what is queued; return the messages accepted.

    ``max_seconds`` bounds a scheduler pass: after it, no new batch is
    claimed and what is left goes out on the next pass.
    """
    settings = get_settings()
    engine = get_engine()
    worker_id = worker_id or settings.worker_id
    clock = _Clock(now or utcnow())

    _claim_due(engine, worker_id=worker_id, now=clock())
    emailing_ids = _sending_ids(engine)
    if not emailing_ids:
        return 0
    send = _Send(
        engine=engine,
        backend=get_backend(settings),
        settings=settings,
        worker_id=worker_id,
        clock=clock,
        max_seconds=max_seconds,
        limiter=RateLimiter(settings.smtp_rate),
    )
    accepted = send.run(emailing_ids)
    if accepted:
        logger.info("worker %s: %s messages accepted", worker_id, accepted)
    return accepted


# --- Actions on one emailing --------------------------------------------------------


def _get(session: Session, emailing_id: int) -> Emailing:
    emailing = session.get(Emailing, emailing_id, populate_existing=True)
    if emailing is None:
        raise NotFoundError("emailing", emailing_id)
    return emailing


def cancel_emailing(
    session: Session, emailing_id: int, *, now: datetime | None = None
) -> Emailing:
    """Stop an emailing: nothing more is claimed, queued deliveries are skipped.

    Deliveries already handed to a connection finish (at most one batch per
    connection) and are counted, so the counters say exactly who got it.
    Commits, so running senders see the cancel at their next batch.
    """
    now = now or utcnow()
    cancelled = session.execute(
        update(Emailing)
        .where(
            Emailing.id == emailing_id,
            Emailing.status.in_([E.DRAFT, E.PENDING, E.SENDING]),
        )
        .values(status=E.CANCELLED, finished_at=now, updated_at=now)
    )
    if cancelled.rowcount != 1:
        session.rollback()
        emailing = _get(session, emailing_id)
        raise ValidationError(
            f"emailing {emailing_id}",
            "status",
            f"it is {emailing.status.value}; only a draft, pending or sending "
            "emailing can be cancelled",
        )
    skipped = session.execute(
        update(Delivery)
        .where(Delivery.emailing_id == emailing_id, Delivery.status == S.QUEUED)
        .values(status=S.SKIPPED, next_attempt_at=None, updated_at=now)
    ).rowcount
    session.execute(
        update(Emailing)
        .where(Emailing.id == emailing_id)
        .values(note=f"Cancelled: {skipped} recipients skipped.")
    )
    session.commit()
    logger.info("emailing %s cancelled: %s deliveries skipped", emailing_id, skipped)
    return _get(session, emailing_id)


def send_now(
    session: Session, emailing_id: int, *, now: datetime | None = None
) -> Emailing:
    """Schedule a draft or pending emailing for the scheduler's next pass.

    Commits.
    """
    now = now or utcnow()
    scheduled = session.execute(
        update(Emailing)
        .where(Emailing.id == emailing_id, Emailing.status.in_([E.DRAFT, E.PENDING]))
        .values(status=E.PENDING, send_at=now, updated_at=now)
    )
    if scheduled.rowcount != 1:
        session.rollback()
        emailing = _get(session, emailing_id)
        raise ValidationError(
            f"emailing {emailing_id}",
            "status",
            f"it is {emailing.status.value}; only a draft or pending emailing "
            "can be sent now",
        )
    session.commit()
    logger.info("emailing %s scheduled to send now", emailing_id)
    return _get(session, emailing_id)


def send_test(
    session: Session,
    emailing_id: int,
    address: str,
    *,
    now: datetime | None = None,
) -> str:
    """Send one test message of an emailing to ``address``; return what happened.

    The message is marked as a test (subject prefix and header), has no
    delivery row and carries test tokens, so it never shows in the emailing's
    statistics. A contact with that address fills the recipient variables.
    """
    now = now or utcnow()
    emailing = _get(session, emailing_id)
    address = address.strip()
    contact = session.scalars(
        select(Contact).where(Contact.email == address.lower())
    ).first()
    recipient = Recipient(
        email=address,
        name=contact.name if contact else "",
        attributes=dict(contact.attributes) if contact else {},
    )
    engine = session.get_bind().engine
    draft = Draft.from_emailing(emailing)
    message = draft.render(
        recipient, link_ids=LinkIds(engine, emailing_id), now=now, test=True
    )
    envelope_to = make_address("", address).addr_spec

    connection = get_backend().connect()
    try:
        outcome = connection.send(
            message.as_bytes(), draft.sender.addr_spec, envelope_to
        )
    except ServerUnavailable as exc:
        raise SendError(f"test of emailing {emailing_id} to {address}: {exc}") from exc
    finally:
        connection.close()
    if isinstance(outcome, Refused):
        raise SendError(
            f"test of emailing {emailing_id} to {address} refused: {outcome.reply}"
        )
    logger.info("emailing %s: test message sent to %s", emailing_id, address)
    return f"Test message sent to {address} ({outcome.reply})."


def recover_stale(
    session: Session, now: datetime, *, worker_id: str | None = None
) -> dict[str, int]:
    """Clean up after dead workers; commits.

    Deliveries a worker left in ``sending`` past the stale timeout become
    ``interrupted`` (never resent: the server may have accepted them). Sending
    emailings whose claim went stale are taken over by this worker.
    """
    settings = get_settings()
    worker_id = worker_id or settings.worker_id
    cutoff = now - timedelta(seconds=settings.stale_claim_seconds)

    # Every pass asks, so ask with reads that use the claim index, and take
    # the write lock only when a dead worker really left something behind.
    open_emailings = select(Emailing.id).where(
        Emailing.status.in_([E.SENDING, E.CANCELLED, E.FAILED])
    )
    stale_deliveries = and_(
        Delivery.emailing_id.in_(open_emailings),
        Delivery.status == S.SENDING,
        Delivery.claimed_at < cutoff,
    )
    stale_emailings = and_(
        Emailing.status == E.SENDING,
        or_(Emailing.claimed_at.is_(None), Emailing.claimed_at < cutoff),
    )
    found = session.scalar(
        select(Delivery.id).where(stale_deliveries).limit(1)
    ) or session.scalar(select(Emailing.id).where(stale_emailings).limit(1))
    if found is None:
        session.rollback()
        return {"interrupted": 0, "taken_over": 0}

    interrupted = session.execute(
        update(Delivery)
        .where(stale_deliveries)
        .values(status=S.INTERRUPTED, smtp_reply=INTERRUPTED_REPLY, updated_at=now)
    ).rowcount
    taken_over = session.execute(
        update(Emailing)
        .where(stale_emailings)
        .values(claimed_by=worker_id, claimed_at=now, updated_at=now)
    ).rowcount
    session.commit()
    if interrupted:
        logger.warning(
            "%s deliveries left in flight by a dead worker marked interrupted",
            interrupted,
        )
    if taken_over:
        logger.info(
            "worker %s took over %s stale emailing claims", worker_id, taken_over
        )
    return {"interrupted": interrupted, "taken_over": taken_over}


def due_count(session: Session, *, now: datetime | None = None) -> int:
    """Pending emailings whose send-at has passed: what the next pass will claim.

    Shown on the Settings page; a number that stays up means no worker runs.
    """
    now = now or utcnow()
    query = (
        select(func.count())
        .select_from(Emailing)
        .where(Emailing.status == E.PENDING, Emailing.send_at <= now)
    )
    return int(session.scalar(query) or 0)
