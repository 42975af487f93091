"""How the emailings did: the figures and tables of the Statistics and Emailings pages.

Everything is aggregated in the database (``GROUP BY`` and ``SUM``), never by
loading raw events into pandas. What is summed is kept with the events by the
event writer, in the same transactions, so the page stays fast at millions of
events and agrees with the events (``counters.recompute_counters`` rebuilds
it all from them):

- per emailing, recipients who opened and clicked, by people and by anyone
  (``open``, ``click``, ``open_any``, ``click_any``), unsubscribes and
  bounces; delivery outcomes come from the deliveries' status index;
- ``TrackingHour``: open and click events per emailing and hour, for the
  totals and the chart;
- per link, clicks by people and by machines, for the top links.

The filters select emailings: those whose sending started in ``[start,
end)``, optionally of one entity group, sequence or emailing. ``human_only``
leaves out machine opens and clicks (privacy proxies, security scanners).

Every rate comes with its numerator and denominator and is 0.0, not an
error, when nothing was sent:

- open rate: recipients who opened / delivered
- click rate: recipients who clicked / delivered
- click-to-open rate: recipients who clicked / recipients who opened
- unsubscribe rate: recipients who unsubscribed / delivered
- bounce rate: bounced / sent

where "sent" counts messages handed to the mail server (delivered, bounced or
failed) and "delivered" those it accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
from sqlalchemy import ColumnElement, Select, case, func, select, type_coerce
from sqlmodel import Session

from sequencer.config import get_settings
from sequencer.db import is_postgres
from sequencer.enums import DeliveryStatus, EmailingStatus, TrackingKind
from sequencer.models import (
    Contact,
    Delivery,
    Emailing,
    EntityGroupMember,
    Link,
    Sequence,
    TrackingEvent,
    TrackingHour,
)
from sequencer.timeutil import UTCDateTime, as_utc

HOURLY_SPAN = timedelta(days=3)
"""Ranges up to this long are charted per hour ("auto" bucket), longer per day."""

RATES = {
    "open_rate": ("opened", "delivered"),
    "click_rate": ("clicked", "delivered"),
    "click_to_open_rate": ("clicked", "opened"),
    "unsubscribe_rate": ("unsubscribed", "delivered"),
    "bounce_rate": ("bounced", "sent"),
}
"""Each rate as (numerator, denominator) column names."""


@dataclass(frozen=True)
class Filters:
    """Which emailings a statistic covers, and whether machines count."""

    start: datetime | None = None
    end: datetime | None = None
    group_id: int | None = None
    sequence_id: int | None = None
    emailing_id: int | None = None
    human_only: bool = False


def rate(numerator: int, denominator: int) -> dict[str, Any]:
    """A rate with what it was computed from; 0.0 when the denominator is 0."""
    value = numerator / denominator if denominator else 0.0
    return {"numerator": int(numerator), "denominator": int(denominator), "rate": value}


def sent_time() -> ColumnElement[Any]:
    """When an emailing went out: its start, else its schedule, else creation."""
    return func.coalesce(Emailing.started_at, Emailing.send_at, Emailing.created_at)


def selected_emailings(filters: Filters) -> Select[Any]:
    """The ids of the emailings the filters cover, as a subquery."""
    statement = select(Emailing.id)
    when = sent_time()
    if filters.start is not None:
        statement = statement.where(when >= as_utc(filters.start))
    if filters.end is not None:
        statement = statement.where(when < as_utc(filters.end))
    if filters.emailing_id is not None:
        statement = statement.where(Emailing.id == filters.emailing_id)
    if filters.sequence_id is not None:
        statement = statement.where(Emailing.sequence_id == filters.sequence_id)
    if filters.group_id is not None:
        in_group = select(EntityGroupMember.entity_id).where(
            EntityGroupMember.group_id == filters.group_id
        )
        sequences = select(Sequence.id).where(
            Sequence.trigger_entity_id.in_(in_group)
            | Sequence.target_entity_id.in_(in_group)
        )
        statement = statement.where(Emailing.sequence_id.in_(sequences))
    return statement


def _count_if(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _total_columns(human_only: bool) -> list[ColumnElement[Any]]:
    """Open and click events (not recipients) over the enclosing rollup rows."""
    h = TrackingHour
    people = h.machine.is_(False)

    def events(kind: TrackingKind, *conditions: ColumnElement[bool]) -> Any:
        condition = h.kind == kind
        for extra in conditions:
            condition = condition & extra
        return func.coalesce(func.sum(case((condition, h.events), else_=0)), 0)

    counted = (people,) if human_only else ()
    return [
        events(TrackingKind.OPEN, *counted).label("opens"),
        events(TrackingKind.CLICK, *counted).label("clicks"),
        events(TrackingKind.OPEN, h.machine.is_(True)).label("machine_opens"),
        events(TrackingKind.CLICK, h.machine.is_(True)).label("machine_clicks"),
    ]


def _rollup_filter(filters: Filters) -> list[ColumnElement[bool]]:
    return [TrackingHour.emailing_id.in_(selected_emailings(filters))]


def _rates(
    frame: pd.DataFrame, pairs: dict[str, tuple[str, str]]
) -> dict[str, pd.Series]:
    """Each rate column from its numerator and denominator columns, zero-safe."""
    rates = {}
    for name, (numerator, denominator) in pairs.items():
        bottom = frame[denominator].astype(float)
        rates[name] = (frame[numerator] / bottom.where(bottom > 0)).fillna(0.0)
    return rates


def _add_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """The rates beside their numerators and denominators, in one step."""
    return pd.concat([frame, pd.DataFrame(_rates(frame, RATES))], axis=1)


# --- Statistics page ------------------------------------------------------------


def figures(
    session: Session,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    group_id: int | None = None,
    sequence_id: int | None = None,
    emailing_id: int | None = None,
    human_only: bool = False,
) -> dict[str, Any]:
    """The headline numbers: counts, event totals, and each rate with its parts."""
    filters = Filters(start, end, group_id, sequence_id, emailing_id, human_only)
    emailings = _per_emailing(filters).subquery("emailings")
    names = _COUNT_NAMES + _TOTAL_NAMES
    sums = [func.coalesce(func.sum(emailings.c[name]), 0).label(name) for name in names]
    row = session.execute(select(*sums)).one()._asdict()
    result: dict[str, Any] = {key: int(value) for key, value in row.items()}
    result["human_only"] = human_only
    for name, (numerator, denominator) in RATES.items():
        result[name] = rate(result[numerator], result[denominator])
    return result


def hour_bucket(column: Any, session: Session) -> ColumnElement[Any]:
    """``column`` truncated to its UTC hour, as the rollup stores hours."""
    if is_postgres(session):
        return func.date_trunc("hour", column)
    return type_coerce(func.strftime("%Y-%m-%d %H:00:00.000000", column), UTCDateTime)


def _day_bucket_postgres(column: Any, zone: str) -> ColumnElement[Any]:
    """Local midnight, back in naive UTC: days as the users live them.

    Stored times are naive UTC: read them as UTC, view them in ``zone``,
    truncate to the day there, and turn that midnight back into UTC.
    """
    as_local = func.timezone(zone, func.timezone("UTC", column))
    midnight = func.date_trunc("day", as_local)
    return type_coerce(func.timezone("UTC", func.timezone(zone, midnight)), UTCDateTime)


def activity_over_time(
    session: Session,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    group_id: int | None = None,
    sequence_id: int | None = None,
    emailing_id: int | None = None,
    human_only: bool = False,
    bucket: str = "auto",
    timezone: str | None = None,
) -> pd.DataFrame:
    """Opens and clicks (events) per hour or per day, within the range.

    Columns ``bucket`` (the bucket's start, UTC), ``opens``, ``clicks``, with
    empty buckets filled with 0. Days are the users' days (``timezone``,
    default the configured one). On PostgreSQL the day is computed in SQL;
    SQLite has no time zones, so its hourly sums are folded into local days
    here (at most 24 rows a day).
    """
    if bucket not in ("auto", "hour", "day"):
        raise ValueError(f"bucket must be 'hour', 'day' or 'auto', not {bucket!r}")
    filters = Filters(start, end, group_id, sequence_id, emailing_id, human_only)
    zone = timezone or get_settings().timezone
    if bucket == "auto":
        span = (end - start) if start and end else None
        bucket = "hour" if span is not None and span <= HOURLY_SPAN else "day"

    h = TrackingHour
    conditions = _rollup_filter(filters)
    if start is not None:
        conditions.append(h.hour >= _hour_floor(as_utc(start)))
    if end is not None:
        conditions.append(h.hour < as_utc(end))
    in_sql_days = bucket == "day" and is_postgres(session)
    key = _day_bucket_postgres(h.hour, zone) if in_sql_days else h.hour
    columns = _total_columns(human_only)[:2]
    statement = (
        select(key.label("bucket"), *columns)
        .where(*conditions)
        .group_by(key)
        .order_by(key)
    )
    frame = pd.DataFrame(
        session.execute(statement).all(), columns=["bucket", "opens", "clicks"]
    )
    if frame.empty:
        return frame.astype({"opens": "int64", "clicks": "int64"})
    frame["bucket"] = pd.to_datetime(frame["bucket"], utc=True)
    if bucket == "day" and not in_sql_days:
        local = frame["bucket"].dt.tz_convert(ZoneInfo(zone))
        frame["bucket"] = local.dt.floor(
            "D", ambiguous=False, nonexistent="shift_forward"
        )
        frame["bucket"] = frame["bucket"].dt.tz_convert("UTC")
        frame = frame.groupby("bucket", as_index=False)[["opens", "clicks"]].sum()
    return _fill_buckets(frame, bucket, zone)


def _hour_floor(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _fill_buckets(frame: pd.DataFrame, bucket: str, zone: str) -> pd.DataFrame:
    """Add the empty buckets between the first and the last, so lines drop to 0."""
    if bucket == "hour":
        full = pd.date_range(frame["bucket"].min(), frame["bucket"].max(), freq="h")
    else:
        local = frame["bucket"].dt.tz_convert(ZoneInfo(zone))
        full = pd.date_range(local.min(), local.max(), freq="D").tz_convert("UTC")
    filled = frame.set_index("bucket").reindex(full, fill_value=0)
    filled.index.name = "bucket"
    return filled.reset_index().astype({"opens": "int64", "clicks": "int64"})


def _per_emailing(filters: Filters) -> Select[Any]:
    """Counts and event totals per emailing that has started sending."""
    chosen = selected_emailings(filters).where(
        Emailing.status.not_in([EmailingStatus.DRAFT, EmailingStatus.PENDING])
    )
    failed = (
        select(Delivery.emailing_id, func.count().label("failed"))
        .where(
            Delivery.emailing_id.in_(chosen),
            Delivery.status == DeliveryStatus.FAILED,
        )
        .group_by(Delivery.emailing_id)
        .subquery("failed")
    )
    totals = (
        select(TrackingHour.emailing_id, *_total_columns(filters.human_only))
        .where(TrackingHour.emailing_id.in_(chosen))
        .group_by(TrackingHour.emailing_id)
        .subquery("totals")
    )
    opened = Emailing.open if filters.human_only else Emailing.open_any
    clicked = Emailing.click if filters.human_only else Emailing.click_any
    failures = func.coalesce(failed.c.failed, 0)
    counts = [
        Emailing.total.label("recipients"),
        (Emailing.sent + Emailing.bounce + failures).label("sent"),
        Emailing.sent.label("delivered"),
        Emailing.bounce.label("bounced"),
        failures.label("failed"),
        opened.label("opened"),
        clicked.label("clicked"),
        Emailing.unsubscribe.label("unsubscribed"),
    ]
    events = [func.coalesce(totals.c[name], 0).label(name) for name in _TOTAL_NAMES]
    return (
        select(
            Emailing.id,
            Emailing.subject,
            Emailing.reference,
            Emailing.sequence_id,
            Sequence.name.label("sequence"),
            Emailing.status,
            sent_time().label("sent_at"),
            *counts,
            *events,
        )
        .where(Emailing.id.in_(chosen))
        .outerjoin(failed, failed.c.emailing_id == Emailing.id)
        .outerjoin(totals, totals.c.emailing_id == Emailing.id)
        .outerjoin(Sequence, Sequence.id == Emailing.sequence_id)
    )


_COUNT_NAMES = [
    "recipients",
    "sent",
    "delivered",
    "bounced",
    "failed",
    "opened",
    "clicked",
    "unsubscribed",
]
_TOTAL_NAMES = ["opens", "clicks", "machine_opens", "machine_clicks"]


def emailing_comparison(
    session: Session,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    group_id: int | None = None,
    sequence_id: int | None = None,
    emailing_id: int | None = None,
    human_only: bool = False,
) -> pd.DataFrame:
    """One row per emailing with recipients, counts, totals and rates; newest first."""
    filters = Filters(start, end, group_id, sequence_id, emailing_id, human_only)
    statement = _per_emailing(filters).order_by(sent_time().desc(), Emailing.id.desc())
    rows = session.execute(statement).all()
    columns = [
        "id",
        "subject",
        "reference",
        "sequence_id",
        "sequence",
        "status",
        "sent_at",
        *_COUNT_NAMES,
        *_TOTAL_NAMES,
    ]
    frame = pd.DataFrame(rows, columns=columns)
    frame["status"] = frame["status"].astype(str)
    frame["sent_at"] = pd.to_datetime(frame["sent_at"], utc=True)
    return _add_rates(_integers(frame))


def per_sequence(
    session: Session,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    group_id: int | None = None,
    sequence_id: int | None = None,
    emailing_id: int | None = None,
    human_only: bool = False,
) -> pd.DataFrame:
    """One row per sequence (None: emailings made by hand) with counts and rates."""
    filters = Filters(start, end, group_id, sequence_id, emailing_id, human_only)
    emailings = _per_emailing(filters).subquery("emailings")
    sums = [
        func.sum(emailings.c[name]).label(name) for name in _COUNT_NAMES + _TOTAL_NAMES
    ]
    statement = (
        select(
            emailings.c.sequence_id,
            emailings.c.sequence,
            func.count(emailings.c.id).label("emailings"),
            *sums,
        )
        .group_by(emailings.c.sequence_id, emailings.c.sequence)
        .order_by(emailings.c.sequence.is_(None), emailings.c.sequence)
    )
    columns = ["sequence_id", "sequence", "emailings", *_COUNT_NAMES, *_TOTAL_NAMES]
    frame = pd.DataFrame(session.execute(statement).all(), columns=columns)
    frame["sequence_id"] = frame["sequence_id"].astype("Int64")
    frame["sequence"] = frame["sequence"].astype(object)
    frame.loc[frame["sequence"].isna(), "sequence"] = None
    return _add_rates(_integers(frame, ["emailings", *_COUNT_NAMES, *_TOTAL_NAMES]))


def top_links(
    session: Session,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    group_id: int | None = None,
    sequence_id: int | None = None,
    emailing_id: int | None = None,
    human_only: bool = False,
    limit: int = 20,
) -> pd.DataFrame:
    """The most clicked URLs: clicks, recipients who clicked, emailings using them.

    Clicks come from the links' counters; recipients are counted from the
    click events of the top links only, through their link index.
    """
    filters = Filters(start, end, group_id, sequence_id, emailing_id, human_only)
    clicks_of = Link.clicks if human_only else Link.clicks + Link.machine_clicks
    clicks = func.sum(clicks_of).label("clicks")
    top = session.execute(
        select(Link.url, clicks, func.count(Link.id).label("emailings"))
        .where(Link.emailing_id.in_(selected_emailings(filters)))
        .group_by(Link.url)
        .having(func.sum(clicks_of) > 0)
        .order_by(clicks.desc(), Link.url)
        .limit(limit)
    ).all()
    columns = ["url", "clicks", "recipients", "emailings"]
    if not top:
        return _integers(pd.DataFrame([], columns=columns), columns[1:])

    event = TrackingEvent
    conditions = [
        Link.url.in_([row.url for row in top]),
        Link.emailing_id.in_(selected_emailings(filters)),
        event.kind == TrackingKind.CLICK,
    ]
    if human_only:
        conditions.append(event.machine.is_(False))
    recipients = dict(
        session.execute(
            select(Link.url, func.count(func.distinct(event.delivery_id)))
            .join(event, event.link_id == Link.id)
            .where(*conditions)
            .group_by(Link.url)
        ).all()
    )
    rows = [(r.url, r.clicks, recipients.get(r.url, 0), r.emailings) for r in top]
    return _integers(pd.DataFrame(rows, columns=columns), columns[1:])


def _integers(frame: pd.DataFrame, names: list[str] | None = None) -> pd.DataFrame:
    """Count columns as int64 (SUM may come back as a decimal on PostgreSQL)."""
    wanted = names or _COUNT_NAMES + _TOTAL_NAMES
    return frame.astype({name: "int64" for name in wanted if name in frame.columns})


# --- Emailings page -------------------------------------------------------------


def emailings_table(session: Session, *, limit: int | None = None) -> pd.DataFrame:
    """Every emailing with its stored counters and their rates; newest first.

    Rates here come from the counters (people only): open, click and
    unsubscribe rates over ``sent`` (accepted by the server), click-to-open
    over ``open``, bounce over ``sent + bounce``.
    """
    statement = (
        select(
            Emailing.id,
            Emailing.subject,
            Emailing.reference,
            Emailing.sequence_id,
            Sequence.name.label("sequence"),
            Emailing.status,
            Emailing.note,
            Emailing.send_at,
            Emailing.created_at,
            Emailing.finished_at,
            Emailing.total,
            Emailing.sent,
            Emailing.open,
            Emailing.click,
            Emailing.unsubscribe,
            Emailing.bounce,
            (Emailing.sent + Emailing.bounce).label("attempted"),
        )
        .outerjoin(Sequence, Sequence.id == Emailing.sequence_id)
        .order_by(Emailing.created_at.desc(), Emailing.id.desc())
    )
    if limit is not None:
        statement = statement.limit(limit)
    rows = session.execute(statement).all()
    frame = pd.DataFrame(rows, columns=list(statement.selected_columns.keys()))
    frame["status"] = frame["status"].astype(str)
    frame["sequence_id"] = frame["sequence_id"].astype("Int64")
    for name in ("send_at", "created_at", "finished_at"):
        frame[name] = pd.to_datetime(frame[name], utc=True)
    pairs = {
        "open_rate": ("open", "sent"),
        "click_rate": ("click", "sent"),
        "ctor": ("click", "open"),
        "unsubscribe_rate": ("unsubscribe", "sent"),
        "bounce_rate": ("bounce", "attempted"),
    }
    frame = pd.concat([frame, pd.DataFrame(_rates(frame, pairs))], axis=1)
    return frame.drop(columns=["attempted"])


def recipients(
    session: Session, emailing_id: int, *, limit: int = 10_000
) -> pd.DataFrame:
    """The recipients of one emailing with their delivery state and activity."""
    event = TrackingEvent
    activity = (
        select(
            event.delivery_id,
            _count_if(event.kind == TrackingKind.OPEN).label("opens"),
            _count_if(event.kind == TrackingKind.CLICK).label("clicks"),
            _count_if(event.machine.is_(True)).label("machine_events"),
        )
        .where(event.emailing_id == emailing_id)
        .group_by(event.delivery_id)
        .subquery("activity")
    )
    statement = (
        select(
            Delivery.id,
            Delivery.email,
            Contact.name,
            Delivery.status,
            Delivery.attempts,
            Delivery.sent_at,
            Delivery.first_open_at,
            Delivery.first_click_at,
            Delivery.unsubscribed_at,
            Delivery.bounced_at,
            func.coalesce(activity.c.opens, 0).label("opens"),
            func.coalesce(activity.c.clicks, 0).label("clicks"),
            func.coalesce(activity.c.machine_events, 0).label("machine_events"),
            Delivery.smtp_reply,
        )
        .outerjoin(Contact, Contact.id == Delivery.contact_id)
        .outerjoin(activity, activity.c.delivery_id == Delivery.id)
        .where(Delivery.emailing_id == emailing_id)
        .order_by(Delivery.id)
        .limit(limit)
    )
    rows = session.execute(statement).all()
    frame = pd.DataFrame(rows, columns=list(statement.selected_columns.keys()))
    frame = frame.rename(columns={"id": "delivery_id"})
    frame["status"] = frame["status"].astype(str)
    return frame


def recipient_events(
    session: Session, emailing_id: int, *, limit: int = 1000
) -> pd.DataFrame:
    """The latest tracking events of one emailing, newest first."""
    event = TrackingEvent
    statement = (
        select(
            event.occurred_at,
            event.kind,
            Delivery.email,
            Link.url,
            event.machine,
            event.machine_reason,
            event.user_agent,
        )
        .outerjoin(Delivery, Delivery.id == event.delivery_id)
        .outerjoin(Link, Link.id == event.link_id)
        .where(event.emailing_id == emailing_id)
        .order_by(event.occurred_at.desc(), event.id.desc())
        .limit(limit)
    )
    rows = session.execute(statement).all()
    frame = pd.DataFrame(rows, columns=list(statement.selected_columns.keys()))
    frame["kind"] = frame["kind"].astype(str)
    return frame


__all__ = [
    "Filters",
    "activity_over_time",
    "emailing_comparison",
    "emailings_table",
    "figures",
    "hour_bucket",
    "per_sequence",
    "rate",
    "recipient_events",
    "recipients",
    "selected_emailings",
    "top_links",
]
