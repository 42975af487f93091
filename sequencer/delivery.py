"""Turning due emailings into sent email, once per recipient.

Senders (one per SMTP connection) claim deliveries in batches through
``claims``, render each message, hand it to the backend and commit the
outcomes. A worker killed mid-send leaves its claimed deliveries in
``sending``; after the stale timeout they become ``interrupted``, never
resent, since the server may have accepted them before the kill.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from sequencer.backends import (
    Accepted,
    Backend,
    RateLimiter,
    Refused,
    ServerUnavailable,
    Uncertain,
    get_backend,
)
from sequencer.claims import (
    INTERRUPTED_REPLY,
    SERVER_DOWN_WAIT,
    Claimed,
    E,
    S,
    claim_batch,
    claim_due,
    finish_if_done,
    open_window,
    record_bounce,
    record_failure,
    record_uncertain,
    release,
    sending_ids,
    skip_cancelled,
)
from sequencer.config import Settings, get_settings
from sequencer.db import get_engine
from sequencer.exceptions import NotFoundError, SendError, ValidationError
from sequencer.message import Draft, LinkIds, Recipient
from sequencer.models import Contact, Delivery, Emailing
from sequencer.timeutil import utcnow

logger = logging.getLogger(__name__)

T = TypeVar("T")

WINDOW = 50
"""Deliveries of a batch a sender opens for sending at a time.

The next window is opened in the transaction that commits what the server
accepted of this one. A worker killed mid-send leaves at most its open
window in doubt: those are marked interrupted, not resent; the rest of its
batch was never tried and goes back to the queue. Each commit costs about
as much as rendering a message.
"""
FLUSH_SECONDS = 1.0
"""Accepted messages are committed at least this often, window or not."""

CANCELLED_EARLY = "Cancelled before sending: nobody was sent anything."

_stop = threading.Event()

_unreachable: dict[str, datetime] = {}
"""When a backend this process could not reach may be tried again, by backend."""
_unreachable_lock = threading.Lock()


def request_stop() -> None:
    """Ask running sends to stop after their current batch (a clean shutdown)."""
    _stop.set()


def allow_sending() -> None:
    """Undo ``request_stop`` when a scheduler starts again in this process."""
    _stop.clear()


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

    def write(
        self, db: Connection, record: Callable[..., T], *args: Any, **kw: Any
    ) -> T:
        """One of the ``claims`` writes on a send loop's connection.

        When the database dropped the connection (a restart, a failover), the
        transaction rolled back and the connection reconnects on its next
        use, so the write is made once more. Every write is safe to repeat:
        what it changes depends on the rows' state, and a claim whose commit
        went through unseen leaves rows that end interrupted, never sent twice.
        """
        try:
            return record(db, *args, **kw)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            logger.warning(
                "worker %s: the database connection was lost, writing again: %s",
                self.worker_id,
                exc.orig,
            )
            return record(db, *args, **kw)

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
        """One connection: claim a batch, send it, until nothing is left.

        The loop keeps one database connection for its claims and outcomes;
        one taken from the pool for each would first be checked with a round
        trip to the database server.
        """
        connection = None
        try:
            with self.engine.connect() as db:
                for emailing_id in emailing_ids:
                    while not self.stopping():
                        batch = self.write(
                            db,
                            claim_batch,
                            emailing_id,
                            worker_id=self.worker_id,
                            now=self.clock(),
                            size=self.settings.batch_size,
                            window=WINDOW,
                        )
                        if not batch:
                            break
                        if connection is None:
                            connection = self.backend.connect()
                        self.send_batch(db, connection, emailing_id, batch)
                    if self.stopping():
                        return
                    self.write(db, finish_if_done, emailing_id, now=self.clock())
        except Exception:
            logger.exception("worker %s: the send loop crashed", self.worker_id)
            raise
        finally:
            if connection is not None:
                connection.close()

    def send_batch(
        self, db: Connection, connection: Any, emailing_id: int, batch: list[Claimed]
    ) -> None:
        """Send a claimed batch one window at a time (the claim opened the first).

        A delivery is tried only once its window is open. One that could not
        be opened was taken back by a worker that thought this one dead, or
        its emailing was cancelled: it is left alone.
        """
        draft, link_ids = self.draft(emailing_id)
        accepted: list[int] = []
        opened = {row.id for row in batch[:WINDOW]}
        opened_until = WINDOW
        flushed_at = time.monotonic()
        for position, delivery in enumerate(batch):
            if position >= opened_until:
                upcoming = [row.id for row in batch[position : position + WINDOW]]
                opened |= self.flush(db, emailing_id, accepted, upcoming)
                opened_until = position + WINDOW
                flushed_at = time.monotonic()
            if delivery.id not in opened:
                continue
            try:
                self.send_one(
                    db,
                    connection,
                    emailing_id,
                    draft,
                    link_ids,
                    delivery,
                    accepted,
                )
            except ServerUnavailable as exc:
                self.flush(db, emailing_id, accepted)
                # Nobody is at fault: hand the rest of the batch back untouched.
                self.unreachable.set()
                logger.warning(
                    "emailing %s: the server is unreachable, sending resumes later: %s",
                    emailing_id,
                    exc,
                )
                self.write(
                    db,
                    release,
                    emailing_id,
                    batch[position:],
                    worker_id=self.worker_id,
                    now=self.clock(),
                    reason=str(exc),
                )
                return
            if time.monotonic() - flushed_at >= FLUSH_SECONDS:
                self.flush(db, emailing_id, accepted)
                flushed_at = time.monotonic()
        self.flush(db, emailing_id, accepted)

    def flush(
        self,
        db: Connection,
        emailing_id: int,
        accepted: list[int],
        upcoming: list[int] | None = None,
    ) -> set[int]:
        """Commit what was accepted and open ``upcoming``; return those opened."""
        if not accepted and not upcoming:
            return set()
        draft, _link_ids = self.draft(emailing_id)
        settled, opened = self.write(
            db,
            open_window,
            emailing_id,
            upcoming or [],
            worker_id=self.worker_id,
            now=self.clock(),
            accepted=list(accepted),
            reply=self.backend.accepted_reply,
            message_id=draft.message_id_parts(),
        )
        if settled:
            logger.debug(
                "emailing %s: %s deliveries sent by worker %s",
                emailing_id,
                settled,
                self.worker_id,
            )
        accepted.clear()
        with self.lock:
            self.accepted += settled
        return opened

    def send_one(
        self,
        db: Connection,
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
            message = draft.compose(recipient, link_ids=link_ids, now=self.clock())
            data = message.as_bytes()
        except (SendError, ValueError) as exc:
            self.write(
                db,
                record_failure,
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
        outcome = connection.send(data, draft.sender.addr_spec, message.envelope_to)
        if isinstance(outcome, Accepted):
            accepted.append(delivery.id)
        elif isinstance(outcome, Uncertain):
            self.write(
                db,
                record_uncertain,
                delivery,
                emailing_id,
                now=self.clock(),
                reply=outcome.reply,
                **common,
            )
        elif outcome.bounce:
            self.write(
                db,
                record_bounce,
                delivery,
                emailing_id,
                now=self.clock(),
                reply=outcome.reply,
                **common,
            )
        else:
            self.write(
                db,
                record_failure,
                delivery,
                emailing_id,
                now=self.clock(),
                reply=outcome.reply,
                max_attempts=self.settings.max_attempts,
                # A 5xx about the sender or the message: retrying cannot help,
                # and the address is not at fault.
                retry=not outcome.permanent,
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

    claim_due(engine, worker_id=worker_id, now=clock())
    emailing_ids = sending_ids(engine)
    if not emailing_ids:
        return 0

    # A server that could not be reached is left alone a while: each pass
    # would otherwise claim a batch, fail to connect and hand it back.
    backend = get_backend(settings)
    where = backend.describe()
    with _unreachable_lock:
        retry_at = _unreachable.get(where)
    if retry_at is not None and clock() < retry_at:
        return 0

    send = _Send(
        engine=engine,
        backend=backend,
        settings=settings,
        worker_id=worker_id,
        clock=clock,
        max_seconds=max_seconds,
        limiter=RateLimiter(settings.smtp_rate),
    )
    accepted = send.run(emailing_ids)
    with _unreachable_lock:
        if send.unreachable.is_set():
            _unreachable[where] = clock() + SERVER_DOWN_WAIT
        else:
            _unreachable.pop(where, None)
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
    if not skip_cancelled(session.connection(), now=now, emailing_id=emailing_id):
        resolved = session.scalar(
            select(Emailing.recipients_resolved).where(Emailing.id == emailing_id)
        )
        note = "Cancelled: 0 recipients skipped." if resolved else CANCELLED_EARLY
        session.execute(
            update(Emailing).where(Emailing.id == emailing_id).values(note=note)
        )
        logger.info("emailing %s cancelled: %s", emailing_id, note)
    session.commit()
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
    if not address:
        raise ValidationError(
            f"test of emailing {emailing_id}", "address", "give the address to send to"
        )
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
    try:
        message = draft.compose(
            recipient, link_ids=LinkIds(engine, emailing_id), now=now, test=True
        )
        data = message.as_bytes()
    except (SendError, ValueError) as exc:
        raise SendError(
            f"test of emailing {emailing_id} to {address}: message not built: {exc}"
        ) from exc

    connection = get_backend().connect()
    try:
        outcome = connection.send(data, draft.sender.addr_spec, message.envelope_to)
    except ServerUnavailable as exc:
        raise SendError(f"test of emailing {emailing_id} to {address}: {exc}") from exc
    finally:
        connection.close()
    if isinstance(outcome, Refused):
        raise SendError(
            f"test of emailing {emailing_id} to {address} refused: {outcome.reply}"
        )
    if isinstance(outcome, Uncertain):
        raise SendError(
            f"test of emailing {emailing_id} to {address}: {outcome.reply}; "
            "it may still arrive"
        )
    logger.info("emailing %s: test message sent to %s", emailing_id, address)
    return f"Test message sent to {address} ({outcome.reply})."


def recover_stale(
    session: Session, now: datetime, *, worker_id: str | None = None
) -> dict[str, int]:
    """Clean up after dead workers; commits.

    Deliveries a worker left in ``sending`` past the stale timeout become
    ``interrupted`` (never resent: the server may have accepted them); those
    it left ``claimed`` were never tried and go back to the queue. Sending
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
    stale_claims = and_(
        Delivery.emailing_id.in_(
            select(Emailing.id).where(Emailing.status == E.SENDING)
        ),
        Delivery.status == S.CLAIMED,
        Delivery.claimed_at < cutoff,
    )
    stale_emailings = and_(
        Emailing.status == E.SENDING,
        or_(Emailing.claimed_at.is_(None), Emailing.claimed_at < cutoff),
    )
    # A delivery back in the queue of an emailing cancelled meanwhile.
    left_queued = and_(
        Delivery.emailing_id.in_(
            select(Emailing.id).where(Emailing.status == E.CANCELLED)
        ),
        Delivery.status.in_([S.QUEUED, S.CLAIMED]),
    )
    found = (
        session.scalar(select(Delivery.id).where(stale_deliveries).limit(1))
        or session.scalar(select(Delivery.id).where(stale_claims).limit(1))
        or session.scalar(select(Emailing.id).where(stale_emailings).limit(1))
        or session.scalar(select(Delivery.id).where(left_queued).limit(1))
    )
    if found is None:
        session.rollback()
        return {"interrupted": 0, "requeued": 0, "taken_over": 0}

    interrupted = session.execute(
        update(Delivery)
        .where(stale_deliveries)
        .values(status=S.INTERRUPTED, smtp_reply=INTERRUPTED_REPLY, updated_at=now)
    ).rowcount
    requeued = session.execute(
        update(Delivery)
        .where(stale_claims)
        .values(status=S.QUEUED, claimed_by=None, updated_at=now)
    ).rowcount
    taken_over = session.execute(
        update(Emailing)
        .where(stale_emailings)
        .values(claimed_by=worker_id, claimed_at=now, updated_at=now)
    ).rowcount
    skip_cancelled(session.connection(), now=now)
    session.commit()
    if interrupted:
        logger.warning(
            "%s deliveries left in flight by a dead worker marked interrupted",
            interrupted,
        )
    if requeued:
        logger.info(
            "%s deliveries claimed by a dead worker and never tried are queued again",
            requeued,
        )
    if taken_over:
        logger.info(
            "worker %s took over %s stale emailing claims", worker_id, taken_over
        )
    return {"interrupted": interrupted, "requeued": requeued, "taken_over": taken_over}


def sending_state(session: Session, emailing_id: int) -> dict[str, Any]:
    """What a user follows of one emailing: status, counters, note, deliveries.

    ``deliveries`` counts the recipients by delivery status (sent, bounced,
    failed, interrupted, skipped, still queued or in flight), which says
    exactly who got it; the counters are the same numbers, kept on the row.
    """
    emailing = _get(session, emailing_id)
    counts = session.execute(
        select(Delivery.status, func.count())
        .where(Delivery.emailing_id == emailing_id)
        .group_by(Delivery.status)
    ).all()
    by_status = {S(status).value: int(count) for status, count in counts}
    return {
        "status": E(emailing.status).value,
        "note": emailing.note or "",
        "started_at": emailing.started_at,
        "finished_at": emailing.finished_at,
        "deliveries": {
            status.value: by_status[status.value]
            for status in S
            if by_status.get(status.value)
        },
        **{
            name: getattr(emailing, name)
            for name in ("total", "sent", "open", "click", "unsubscribe", "bounce")
        },
    }


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
