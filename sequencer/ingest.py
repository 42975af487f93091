"""Writing one batch of opens and clicks, and everything kept with them.

In one transaction per batch: machine activity is flagged (see ``machines``),
the events are appended, added to the hourly rollup (``TrackingHour``) and to
their links' click counts, each recipient's first open and click times are
set, and the emailing's counters move (see ``counters`` for what they mean).
The background writer (``recorder``) calls ``write_events``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BindParameter,
    Connection,
    Dialect,
    Engine,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlmodel import Session

from sequencer import machines
from sequencer.db import is_postgres
from sequencer.enums import TrackingKind
from sequencer.models import Delivery, Emailing, Link, TrackingEvent, TrackingHour
from sequencer.tokens import secret_key

logger = logging.getLogger(__name__)

_CHUNK = 500
"""Ids per ``IN (...)`` list, well under SQLite's bound-parameter limit."""

_EVENTS = TrackingEvent.__table__  # type: ignore[attr-defined]

_EVENT_COLUMNS = [
    "kind",
    "emailing_id",
    "delivery_id",
    "contact_id",
    "link_id",
    "occurred_at",
    "user_agent",
    "client_hash",
    "machine",
    "machine_reason",
]

_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
"""How SQLAlchemy stores a DATETIME on SQLite; comparisons rely on it."""


@dataclass(slots=True)
class PendingEvent:
    """An open or click taken by an endpoint and not yet written.

    ``address`` is the client's IP address: used to flag proxies, then
    hashed; it is never stored.
    """

    kind: TrackingKind
    delivery_id: int
    link_id: int | None
    occurred_at: datetime
    user_agent: str
    address: str | None


@dataclass(slots=True)
class _Recipient:
    emailing_id: int
    contact_id: int | None
    sent_at: datetime | None
    first_open_at: datetime | None


def _chunks(ids: Iterable[int]) -> Iterable[list[int]]:
    ordered = sorted(set(ids))
    for start in range(0, len(ordered), _CHUNK):
        yield ordered[start : start + _CHUNK]


def client_hash(address: str | None) -> str:
    """A keyed hash of the client's network, not of the person.

    IPv4 is cut to its /24 and IPv6 to its /48 before hashing, and the hash is
    keyed with the secret key, so the stored value can tell proxies and
    scanners apart but cannot be turned back into an address.
    """
    if not address:
        return ""
    return _network_hash(address, secret_key())


@lru_cache(maxsize=65536)
def _network_hash(address: str, key: str) -> str:
    """Cached: the same proxies and offices come back all day."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        network = address
    else:
        prefix = 24 if ip.version == 4 else 48
        network = str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
    secret = key.encode("utf-8")[:64]
    return hashlib.blake2b(network.encode(), key=secret, digest_size=16).hexdigest()


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour of an instant: the rollup's bucket."""
    return moment.replace(minute=0, second=0, microsecond=0)


def write_events(engine: Engine, batch: list[PendingEvent]) -> int:
    """Append a batch of opens and clicks and move the counters; return rows.

    One transaction: the events, their hourly rollup, the recipients' first
    open and click times and the emailing counters commit together, so the
    numbers never disagree with the events.
    """
    clicks = any(event.kind == TrackingKind.CLICK for event in batch)
    recipients = _recipients(
        engine, (event.delivery_id for event in batch), with_times=clicks
    )
    rows = _event_rows(batch, recipients)
    if not rows:
        return 0

    with engine.begin() as connection:
        # Scanner bursts are decided before the insert, so rows go in final.
        reflagged = _flag_bursts(connection, rows)
        _insert_events(connection, rows)
        _roll_up(connection, rows, reflagged)
        _count_link_clicks(connection, rows, reflagged)
        _advance_recipients(
            connection, rows, {event.delivery_id for event in reflagged}
        )

    machine = sum(1 for row in rows if row["machine"])
    logger.debug("wrote %s tracking events (%s machine)", len(rows), machine)
    return len(rows)


@lru_cache(maxsize=4)
def _insert_sql(dialect: Dialect) -> tuple[str, tuple[str, ...] | None]:
    """The event INSERT compiled once for a dialect, with its parameter order."""
    statement = insert(_EVENTS).inline()
    compiled = statement.compile(dialect=dialect, column_keys=_EVENT_COLUMNS)
    order = tuple(compiled.positiontup or ()) if compiled.positional else None
    return str(compiled), order


def _insert_events(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert event rows through the driver, skipping per-row ORM processing.

    The pixel's throughput depends on this loop: values are converted here
    once, as the column types would (naive UTC times, enum values), and the
    statement is the one SQLAlchemy compiled for the dialect.
    """
    sql, order = _insert_sql(connection.dialect)
    sqlite = connection.dialect.name == "sqlite"
    params: list[Any] = []
    for row in rows:
        moment = row["occurred_at"].astimezone(UTC).replace(tzinfo=None)
        values = {
            **row,
            "kind": row["kind"].value,
            "occurred_at": moment.strftime(_SQLITE_TIME) if sqlite else moment,
        }
        params.append(tuple(values[key] for key in order) if order else values)
    connection.exec_driver_sql(sql, params)


def _recipients(
    engine: Engine, delivery_ids: Iterable[int], *, with_times: bool
) -> dict[int, _Recipient]:
    """What each delivery of a batch belongs to, in a short read of its own.

    Sending and first-open times only matter to classify clicks, so a batch of
    opens alone does not read them.
    """
    columns = [Delivery.id, Delivery.emailing_id, Delivery.contact_id]
    if with_times:
        columns += [Delivery.sent_at, Delivery.first_open_at]
    found: dict[int, _Recipient] = {}
    with engine.connect() as connection:
        for chunk in _chunks(delivery_ids):
            statement = select(*columns).where(Delivery.id.in_(chunk))
            for row in connection.execute(statement):
                times = (row[3], row[4]) if with_times else (None, None)
                found[row[0]] = _Recipient(row[1], row[2], *times)
    return found


def _event_rows(
    batch: list[PendingEvent], recipients: dict[int, _Recipient]
) -> list[dict[str, Any]]:
    """Rows to insert, each flagged as a machine's or a person's."""
    rows = []
    opened: set[int] = set()
    for event in sorted(batch, key=lambda event: event.occurred_at):
        recipient = recipients.get(event.delivery_id)
        if recipient is None:
            logger.debug("dropped an event of deleted delivery %s", event.delivery_id)
            continue
        if event.kind == TrackingKind.OPEN:
            reason = machines.classify_open(event.user_agent, event.address)
            if not reason:
                opened.add(event.delivery_id)
        else:
            reason = machines.classify_click(
                event.user_agent,
                event.address,
                occurred_at=event.occurred_at,
                delivered_at=recipient.sent_at,
                opened_before=(
                    event.delivery_id in opened or recipient.first_open_at is not None
                ),
            )
        rows.append(
            {
                "kind": event.kind,
                "emailing_id": recipient.emailing_id,
                "delivery_id": event.delivery_id,
                "contact_id": recipient.contact_id,
                "link_id": event.link_id,
                "occurred_at": event.occurred_at,
                "user_agent": event.user_agent[:512],
                "client_hash": client_hash(event.address),
                "machine": bool(reason),
                "machine_reason": reason,
            }
        )
    return rows


@dataclass(frozen=True, slots=True)
class _StoredClick:
    """A click from an earlier batch that a burst turned out to include."""

    event_id: int
    delivery_id: int
    emailing_id: int
    link_id: int | None
    occurred_at: datetime


def _flag_bursts(
    connection: Connection, rows: list[dict[str, Any]]
) -> list[_StoredClick]:
    """Flag clicks of one recipient on many links at once.

    The batch's own click rows are flagged in place; clicks stored by earlier
    batches that belong to a burst are flagged in the database and returned,
    so their counts can be moved. Looks back a minute, so a burst split
    across batches is seen whole.
    """
    new_clicks: dict[int, list[machines.Click]] = defaultdict(list)
    for position, row in enumerate(rows):
        if row["kind"] == TrackingKind.CLICK:
            # Negative ids stand for rows not inserted yet.
            click = machines.Click(-1 - position, row["link_id"], row["occurred_at"])
            new_clicks[row["delivery_id"]].append(click)
    if not new_clicks:
        return []

    since = min(row["occurred_at"] for row in rows) - timedelta(minutes=1)
    stored: dict[int, list[machines.Click]] = defaultdict(list)
    stored_rows: dict[int, _StoredClick] = {}
    already_machine: set[int] = set()
    for chunk in _chunks(new_clicks):
        statement = select(
            TrackingEvent.id,
            TrackingEvent.delivery_id,
            TrackingEvent.emailing_id,
            TrackingEvent.link_id,
            TrackingEvent.occurred_at,
            TrackingEvent.machine,
        ).where(
            TrackingEvent.delivery_id.in_(chunk),
            TrackingEvent.kind == TrackingKind.CLICK,
            TrackingEvent.occurred_at >= since,
        )
        for row in connection.execute(statement):
            stored[row.delivery_id].append(
                machines.Click(row.id, row.link_id, row.occurred_at)
            )
            stored_rows[row.id] = _StoredClick(
                row.id, row.delivery_id, row.emailing_id, row.link_id, row.occurred_at
            )
            if row.machine:
                already_machine.add(row.id)

    emailing_ids = {
        rows[-1 - click.event_id]["emailing_id"]
        for clicks in new_clicks.values()
        for click in clicks
    }
    link_counts = dict(
        connection.execute(
            select(Link.emailing_id, func.count(Link.id))
            .where(Link.emailing_id.in_(emailing_ids))
            .group_by(Link.emailing_id)
        ).all()
    )

    flagged_stored: list[_StoredClick] = []
    for delivery_id, clicks in new_clicks.items():
        emailing_id = rows[-1 - clicks[0].event_id]["emailing_id"]
        burst = machines.burst_clicks(
            clicks + stored[delivery_id], link_count=link_counts.get(emailing_id, 0)
        )
        for event_id in burst:
            if event_id < 0:
                row = rows[-1 - event_id]
                if not row["machine"]:
                    row["machine"] = True
                    row["machine_reason"] = machines.EVERY_LINK
            elif event_id not in already_machine:
                flagged_stored.append(stored_rows[event_id])

    for chunk in _chunks(click.event_id for click in flagged_stored):
        connection.execute(
            update(TrackingEvent)
            .where(TrackingEvent.id.in_(chunk))
            .values(machine=True, machine_reason=machines.EVERY_LINK)
        )
    if flagged_stored:
        logger.info(
            "clicks %s flagged as a scanner's: every link at once",
            sorted(click.event_id for click in flagged_stored),
        )
    return flagged_stored


def _roll_up(
    connection: Connection,
    rows: list[dict[str, Any]],
    reflagged: list[_StoredClick],
) -> None:
    """Add the batch to the hourly rollup; move re-flagged clicks to machines."""
    counts: dict[tuple[int, datetime, str, bool], int] = defaultdict(int)
    for row in rows:
        key = (
            row["emailing_id"],
            hour_of(row["occurred_at"]),
            row["kind"],
            row["machine"],
        )
        counts[key] += 1
    for click in reflagged:
        hour = hour_of(click.occurred_at)
        counts[(click.emailing_id, hour, TrackingKind.CLICK, False)] -= 1
        counts[(click.emailing_id, hour, TrackingKind.CLICK, True)] += 1

    values = [
        {"emailing_id": e, "hour": h, "kind": k, "machine": m, "events": n}
        for (e, h, k, m), n in sorted(counts.items(), key=_rollup_order)
        if n
    ]
    if values:
        add_to_rollup(connection, values)


def _rollup_order(item: tuple[tuple[int, datetime, str, bool], int]) -> tuple:
    (emailing_id, hour, kind, machine), _count = item
    return (emailing_id, hour, str(kind), machine)


def _count_link_clicks(
    connection: Connection,
    rows: list[dict[str, Any]],
    reflagged: list[_StoredClick],
) -> None:
    """Add the batch's clicks to their links' people and machine counts."""
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for row in rows:
        if row["kind"] == TrackingKind.CLICK and row["link_id"] is not None:
            counts[row["link_id"]]["machine" if row["machine"] else "people"] += 1
    for click in reflagged:
        if click.link_id is not None:
            counts[click.link_id]["people"] -= 1
            counts[click.link_id]["machine"] += 1
    if not counts:
        return
    table = Link.__table__  # type: ignore[attr-defined]
    connection.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(
            clicks=table.c.clicks + bindparam("b_people"),
            machine_clicks=table.c.machine_clicks + bindparam("b_machine"),
        ),
        [
            {"b_id": link_id, "b_people": n["people"], "b_machine": n["machine"]}
            for link_id, n in sorted(counts.items())
        ],
    )


def add_to_rollup(
    connection: Connection | Session, values: list[dict[str, Any]]
) -> None:
    """Add event counts to ``TrackingHour`` rows, creating them as needed.

    ``INSERT ... ON CONFLICT DO UPDATE`` on both backends, so two writers
    adding to one hour both count. Rows are given in key order, so two
    writers never wait on each other in a cycle.
    """
    bind = connection if isinstance(connection, Connection) else connection.get_bind()
    if bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert
    statement = upsert(TrackingHour.__table__)  # type: ignore[attr-defined]
    statement = statement.on_conflict_do_update(
        index_elements=["emailing_id", "hour", "kind", "machine"],
        set_={"events": TrackingHour.__table__.c.events + statement.excluded.events},  # type: ignore[attr-defined]
    )
    connection.execute(statement, values)


_FIRSTS = ("open", "click", "open_any", "click_any")


@dataclass(slots=True)
class _Firsts:
    """The four first-activity times of a delivery."""

    open: datetime | None
    click: datetime | None
    open_any: datetime | None
    click_any: datetime | None

    def opened(self) -> bool:
        """Opened by a person; a click counts as an open (images blocked)."""
        return self.open is not None or self.click is not None

    def clicked(self) -> bool:
        return self.click is not None

    def opened_any(self) -> bool:
        return self.open_any is not None or self.click_any is not None

    def clicked_any(self) -> bool:
        return self.click_any is not None


def _advance_recipients(
    connection: Connection, rows: list[dict[str, Any]], reflagged: set[int]
) -> None:
    """Set first open/click times of the batch's recipients and move counters.

    Delivery rows are locked (PostgreSQL) in id order, so two writers never
    count one recipient twice and never deadlock. A delivery whose earlier
    clicks were re-flagged has its people-only times read again from events.
    """
    # Rows come in time order, so the first time seen is the earliest.
    firsts: dict[str, dict[int, datetime]] = {
        "open": {},
        "click": {},
        "open_any": {},
        "click_any": {},
    }
    for row in rows:
        kind = "open" if row["kind"] == TrackingKind.OPEN else "click"
        firsts[f"{kind}_any"].setdefault(row["delivery_id"], row["occurred_at"])
        if not row["machine"]:
            firsts[kind].setdefault(row["delivery_id"], row["occurred_at"])
    seen = set(firsts["open_any"]) | set(firsts["click_any"])

    rederived = _human_firsts(connection, reflagged) if reflagged else {}
    may_change = _may_change(firsts, rows[0]["occurred_at"], reflagged)
    deltas: dict[int, Counter[str]] = defaultdict(Counter)
    changes = []
    for chunk in _chunks(seen):
        statement = (
            select(
                Delivery.id,
                Delivery.emailing_id,
                Delivery.first_open_at,
                Delivery.first_click_at,
                Delivery.first_open_any_at,
                Delivery.first_click_any_at,
            )
            .where(Delivery.id.in_(chunk), may_change)
            .order_by(Delivery.id)
        )
        if is_postgres(connection.engine):
            statement = statement.with_for_update()
        for row in connection.execute(statement):
            old = _Firsts(*row[2:])
            batch = _Firsts(*(firsts[name].get(row.id) for name in _FIRSTS))
            if row.id in reflagged:
                human_open, human_click = rederived.get(row.id, (None, None))
            else:
                human_open = _earliest(old.open, batch.open)
                human_click = _earliest(old.click, batch.click)
            new = _Firsts(
                human_open,
                human_click,
                _earliest(old.open_any, batch.open_any),
                _earliest(old.click_any, batch.click_any),
            )
            if new == old:
                continue
            delta = deltas[row.emailing_id]
            delta["open"] += int(new.opened()) - int(old.opened())
            delta["click"] += int(new.clicked()) - int(old.clicked())
            delta["open_any"] += int(new.opened_any()) - int(old.opened_any())
            delta["click_any"] += int(new.clicked_any()) - int(old.clicked_any())
            changes.append(
                {
                    "b_id": row.id,
                    "b_first_open_at": new.open,
                    "b_first_click_at": new.click,
                    "b_first_open_any_at": new.open_any,
                    "b_first_click_any_at": new.click_any,
                }
            )

    if changes:
        table = Delivery.__table__  # type: ignore[attr-defined]
        connection.execute(
            update(table)
            .where(table.c.id == _bind("id"))
            .values(
                first_open_at=_bind("first_open_at"),
                first_click_at=_bind("first_click_at"),
                first_open_any_at=_bind("first_open_any_at"),
                first_click_any_at=_bind("first_click_any_at"),
            ),
            changes,
        )
    for emailing_id in sorted(deltas):
        moved = {name: count for name, count in deltas[emailing_id].items() if count}
        if moved:
            connection.execute(
                update(Emailing)
                .where(Emailing.id == emailing_id)
                .values(
                    {
                        name: getattr(Emailing, name) + count
                        for name, count in moved.items()
                    }
                )
            )


def _may_change(
    firsts: dict[str, dict[int, datetime]], earliest: datetime, reflagged: set[int]
) -> Any:
    """Which delivery rows a batch can change, so the others are not read.

    A recipient who opened before and opens again changes nothing: only a
    time still empty, or one later than the batch's earliest event (events
    written by another process out of order), can move. Most repeat opens
    are filtered out in the database this way.
    """
    columns = {
        "open": Delivery.first_open_at,
        "click": Delivery.first_click_at,
        "open_any": Delivery.first_open_any_at,
        "click_any": Delivery.first_click_any_at,
    }
    conditions = [
        condition
        for name, column in columns.items()
        if firsts[name]
        for condition in (column.is_(None), column > earliest)
    ]
    if reflagged:
        conditions.append(Delivery.id.in_(sorted(reflagged)))
    return or_(*conditions)


def _bind(name: str) -> BindParameter[Any]:
    column = Delivery.__table__.c[name]  # type: ignore[attr-defined]
    return bindparam(f"b_{name}", type_=column.type)


def _earliest(stored: datetime | None, seen: datetime | None) -> datetime | None:
    if stored is None:
        return seen
    if seen is None:
        return stored
    return min(stored, seen)


def _human_firsts(
    connection: Connection, delivery_ids: set[int]
) -> dict[int, tuple[datetime | None, datetime | None]]:
    """First human open and click of each delivery, read from its events."""
    firsts: dict[int, list[datetime | None]] = defaultdict(lambda: [None, None])
    for chunk in _chunks(delivery_ids):
        statement = (
            select(
                TrackingEvent.delivery_id,
                TrackingEvent.kind,
                func.min(TrackingEvent.occurred_at),
            )
            .where(
                TrackingEvent.delivery_id.in_(chunk),
                TrackingEvent.kind.in_([TrackingKind.OPEN, TrackingKind.CLICK]),
                TrackingEvent.machine.is_(False),
            )
            .group_by(TrackingEvent.delivery_id, TrackingEvent.kind)
        )
        for delivery_id, kind, first in connection.execute(statement):
            firsts[delivery_id][0 if kind == TrackingKind.OPEN else 1] = first
    return {key: (value[0], value[1]) for key, value in firsts.items()}
