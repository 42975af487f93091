"""How long does the Statistics page's aggregation take over 1,000,000 events?

Builds a database holding 100 emailings sent over the last 30 days to 2,000
recipients each, and 1,000,000 tracking events (opens, clicks, some opens by
machines, unsubscribes, bounces), with the deliveries' first-activity times,
the emailing and link counters and the hourly rollup as the event writer
leaves them (checked on one emailing against ``recompute_counters``). Then
times, as the Statistics page calls them for its default view (the last 30
days, all activity, no filter): ``figures``, ``activity_over_time`` (per day),
``emailing_comparison``, ``per_sequence``, ``top_links`` and
``emailings_table``; against one plain SQL ``GROUP BY`` over the same events
(``SELECT emailing_id, kind, count(*) FROM trackingevent GROUP BY 1, 2``).
Each is timed as the best of several runs. The last line prints the ratio
page / plain. Target: at most 2.

    python bench/stats.py [--events 1000000] [--url postgresql://...]

With ``--url``, the tables of that database are dropped and rebuilt: point it
at a database of its own.
"""

from __future__ import annotations

import argparse
import atexit
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, text  # noqa: E402
from sqlmodel import Session, SQLModel, select  # noqa: E402

from sequencer import counters, db, stats  # noqa: E402
from sequencer.models import (  # noqa: E402
    Delivery,
    Emailing,
    Entity,
    EntityGroup,
    EntityGroupMember,
    Link,
    Sender,
    Sequence,
    TrackingHour,
)
from sequencer.system import ensure_system_entities  # noqa: E402

EMAILINGS = 100
RECIPIENTS = 2000
LINKS = 5
SEQUENCES = 10
AGENT = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15"


def _stamp(moment: datetime) -> str:
    """A naive UTC time as SQLAlchemy stores it on SQLite."""
    return moment.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def build(url: str, events: int, now: datetime, seed: int = 7) -> int:
    """Fill the database; return the number of events written."""
    rng = random.Random(seed)
    engine = db.make_engine(url)
    if db.is_postgres(engine):
        SQLModel.metadata.drop_all(engine)
    db.create_schema(engine)
    with Session(engine) as session:
        ensure_system_entities(session)
        contact = session.exec(select(Entity).where(Entity.name == "contact")).one()
        target = session.exec(select(Entity).where(Entity.name == "emailing")).one()
        group = EntityGroup(name="Customers")
        sender = Sender(name="Shop", email="shop@example.com")
        session.add_all([group, sender])
        session.flush()
        session.add(EntityGroupMember(group_id=group.id, entity_id=contact.id))
        sequences = [
            Sequence(
                name=f"Sequence {n}",
                trigger_entity_id=contact.id,
                trigger_action="update",
                target_entity_id=target.id,
                target_action="create",
            )
            for n in range(SEQUENCES)
        ]
        session.add_all(sequences)
        session.commit()
        sequence_ids = [sequence.id for sequence in sequences]
        sender_id = sender.id

    per_delivery = events / (EMAILINGS * RECIPIENTS)
    written = 0
    event_rows: list[tuple] = []
    raw = engine.raw_connection()
    postgres = db.is_postgres(engine)
    for number in range(EMAILINGS):
        sent_at = now - timedelta(days=30) + timedelta(hours=7 * number + 1)
        with engine.begin() as connection:
            emailing_id = connection.execute(
                insert(Emailing).values(
                    subject=f"Emailing {number}",
                    sender_id=sender_id,
                    sequence_id=rng.choice(sequence_ids + [None]),
                    status="sent",
                    send_at=sent_at,
                    started_at=sent_at,
                    finished_at=sent_at,
                    contact_lists=[],
                    tag_filter=[],
                    total=RECIPIENTS,
                )
            ).inserted_primary_key[0]
            link_ids = [
                connection.execute(
                    insert(Link).values(
                        emailing_id=emailing_id,
                        url=f"https://shop.example.com/{number}/{n}?utm=mail",
                        url_hash=f"{number:08d}{n:056d}",
                    )
                ).inserted_primary_key[0]
                for n in range(LINKS)
            ]
        deliveries, rollup, counters, emailing_events, link_clicks = _recipients(
            rng, emailing_id, link_ids, sent_at, now, per_delivery
        )
        with engine.begin() as connection:
            connection.execute(insert(Delivery), deliveries)
            delivery_ids = (
                connection.execute(
                    select(Delivery.id)
                    .where(Delivery.emailing_id == emailing_id)
                    .order_by(Delivery.id)
                )
                .scalars()
                .all()
            )
            if rollup:  # a small --events leaves some emailings without any
                connection.execute(insert(TrackingHour), rollup)
            connection.execute(
                Emailing.__table__.update()
                .where(Emailing.id == emailing_id)
                .values(**counters)
            )
            for link_id, clicks in link_clicks.items():
                connection.execute(
                    Link.__table__.update()
                    .where(Link.id == link_id)
                    .values(clicks=clicks)
                )
        for index, kind, moment, link_id, machine in emailing_events:
            event_rows.append(
                (
                    kind,
                    emailing_id,
                    delivery_ids[index],
                    link_id,
                    moment.replace(tzinfo=None) if postgres else _stamp(moment),
                    AGENT if not machine else "Mozilla/5.0",
                    "",
                    machine,
                    "apple mail privacy protection" if machine else "",
                )
            )
        written += len(emailing_events)
    _insert_events(raw, event_rows, postgres)
    raw.close()
    with engine.begin() as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()
    return written


def _recipients(rng, emailing_id, link_ids, sent_at, now, per_delivery):
    """Deliveries, rollup rows, counters and events of one emailing."""
    deliveries = []
    link_clicks: Counter = Counter()
    hours: Counter = Counter()
    events = []
    counters = Counter()
    for index in range(RECIPIENTS):
        status = "bounced" if rng.random() < 0.02 else "sent"
        row = {
            "emailing_id": emailing_id,
            "contact_id": None,
            "email": f"r{emailing_id}-{index}@example.com",
            "status": status,
            "attempts": 1,
            "sent_at": sent_at if status == "sent" else None,
            "bounced_at": sent_at if status == "bounced" else None,
        }
        firsts = {"open": None, "click": None, "open_any": None, "click_any": None}
        if status == "sent":
            for _ in range(rng.randint(0, round(2 * per_delivery))):
                moment = sent_at + timedelta(minutes=rng.expovariate(1 / 600))
                if moment >= now:
                    continue
                is_click = rng.random() < 0.2
                machine = not is_click and rng.random() < 0.25
                kind = "click" if is_click else "open"
                link_id = rng.choice(link_ids) if is_click else None
                events.append((index, kind, moment, link_id, machine))
                if is_click:
                    link_clicks[link_id] += 1
                hour = moment.replace(minute=0, second=0, microsecond=0)
                hours[(hour, kind, machine)] += 1
                for name in (kind, f"{kind}_any"):
                    if name == kind and machine:
                        continue
                    if firsts[name] is None or moment < firsts[name]:
                        firsts[name] = moment
            if firsts["open"] or firsts["click"]:
                counters["open"] += 1
            if firsts["click"]:
                counters["click"] += 1
            if firsts["open_any"] or firsts["click_any"]:
                counters["open_any"] += 1
            if firsts["click_any"]:
                counters["click_any"] += 1
            if firsts["open_any"] and rng.random() < 0.01:
                row["unsubscribed_at"] = firsts["open_any"]
                counters["unsubscribe"] += 1
                events.append((index, "unsubscribe", firsts["open_any"], None, False))
        else:
            counters["bounce"] += 1
            events.append((index, "bounce", sent_at, None, False))
        counters["sent"] += status == "sent"
        row |= {f"first_{name}_at": value for name, value in firsts.items()}
        deliveries.append(row)
    rollup = [
        {
            "emailing_id": emailing_id,
            "hour": hour,
            "kind": kind,
            "machine": machine,
            "events": count,
        }
        for (hour, kind, machine), count in hours.items()
    ]
    return deliveries, rollup, dict(counters), events, link_clicks


def _insert_events(raw, rows: list[tuple], postgres: bool) -> None:
    columns = (
        "kind, emailing_id, delivery_id, link_id, occurred_at, user_agent, "
        "client_hash, machine, machine_reason"
    )
    cursor = raw.cursor()
    if postgres:
        with cursor.copy(f"COPY trackingevent ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    else:
        marks = ", ".join("?" * 9)
        cursor.executemany(
            f"INSERT INTO trackingevent ({columns}) VALUES ({marks})", rows
        )
    raw.commit()
    cursor.close()


def check_counters(engine) -> None:
    """The built counters of one emailing equal those rebuilt from its events."""
    names = ("open", "click", "unsubscribe", "bounce", "open_any", "click_any")
    with Session(engine) as session:
        emailing = session.exec(select(Emailing).order_by(Emailing.id)).first()
        built = {name: getattr(emailing, name) for name in names}
        emailing_id = emailing.id
        rebuilt = counters.recompute_counters(session, emailing_id)
        session.rollback()
    if built != rebuilt:
        raise SystemExit(f"built counters {built} differ from the events {rebuilt}")
    print(f"emailing {emailing_id}: counters agree with its events: {built}")


def page_aggregation(session: Session, start: datetime, end: datetime) -> None:
    """What the Statistics page asks for, for its default view."""
    filters = {
        "start": start,
        "end": end,
        "group_id": None,
        "sequence_id": None,
        "emailing_id": None,
        "human_only": False,
    }
    stats.figures(session, **filters)
    stats.activity_over_time(session, bucket="day", **filters)
    stats.emailing_comparison(session, **filters)
    stats.per_sequence(session, **filters)
    stats.top_links(session, **filters)
    stats.emailings_table(session)


def plain_group_by(session: Session) -> None:
    session.execute(
        text(
            "SELECT emailing_id, kind, count(*) FROM trackingevent "
            "GROUP BY emailing_id, kind"
        )
    ).all()


def best_of(runs: int, work) -> tuple[float, float]:
    """Best and median time of ``runs`` calls."""
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return min(timings), statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--url", help="database URL (default: a new SQLite file)")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="bench-stats-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    url = args.url or f"sqlite:///{Path(folder) / 'stats.db'}"
    now = datetime.now(UTC).replace(microsecond=0)
    started = time.perf_counter()
    written = build(url, args.events, now)
    print(f"database: {url.split('://')[0]}")
    print(f"built {written:,} events in {time.perf_counter() - started:.1f} s")

    engine = db.make_engine(url)
    check_counters(engine)
    start, end = now - timedelta(days=30), now + timedelta(days=1)
    with Session(engine) as session:
        plain_group_by(session)  # warm the cache alike for both
        page_aggregation(session, start, end)
        plain, plain_median = best_of(args.runs, lambda: plain_group_by(session))
        page, page_median = best_of(
            args.runs, lambda: page_aggregation(session, start, end)
        )
    engine.dispose()
    print(f"plain GROUP BY: {plain * 1000:.0f} ms (median {plain_median * 1000:.0f})")
    print(f"page:           {page * 1000:.0f} ms (median {page_median * 1000:.0f})")
    ratio = page / plain
    verdict = "ok" if ratio <= 2 else "MISSED"
    print(f"ratio {ratio:.2f} (target <= 2) {verdict}")


if __name__ == "__main__":
    main()
