"""Statistics on a small known data set, on SQLite and PostgreSQL.

The events go through the real writer (``ingest.write_events``), so the
rollup, the recipients' first-activity times and the counters are the ones
production builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from sequencer import counters, ingest, links, stats
from sequencer.enums import RecordAction, TrackingKind
from sequencer.models import (
    Delivery,
    Emailing,
    Entity,
    EntityGroup,
    EntityGroupMember,
    Link,
    Sequence,
    TrackingHour,
)
from tests.tracking_factories import make_sender, make_sent_emailing

BROWSER = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15"
START = datetime(2026, 12, 1, tzinfo=UTC)
END = datetime(2026, 12, 8, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=UTC)


@dataclass
class DataSet:
    a: Emailing
    b: Emailing
    old: Emailing
    sequence: Sequence
    group: EntityGroup
    link_sale: str
    link_shoes: str


def _event(kind, delivery, moment, *, link_id=None, agent=BROWSER, address=None):
    return ingest.PendingEvent(kind, delivery.id, link_id, moment, agent, address)


@pytest.fixture
def data(engine: Engine, session: Session) -> DataSet:
    """Emailing A (sequence, 4 recipients), B (by hand, 2), and one from November.

    A, sent Dec 1 09:00 UTC: d0 opens twice and clicks; d1 is opened by Apple's
    proxy only; d2 clicks with images off, then unsubscribes; d3 bounces.
    B, sent Dec 5 14:00: d4 opens at 23:30 UTC (Dec 6 in Paris); d5 nothing.
    """
    contact = session.exec(select(Entity).where(Entity.name == "contact")).one()
    emailing_entity = session.exec(
        select(Entity).where(Entity.name == "emailing")
    ).one()
    sequence = Sequence(
        name="Welcome",
        trigger_entity_id=contact.id,
        trigger_action=RecordAction.CREATE,
        target_entity_id=emailing_entity.id,
        target_action=RecordAction.CREATE,
    )
    group = EntityGroup(name="People")
    session.add_all([sequence, group])
    session.flush()
    session.add(EntityGroupMember(group_id=group.id, entity_id=contact.id))
    sender = make_sender(session)
    session.commit()

    a, (d0, d1, d2, d3) = make_sent_emailing(
        session, recipients=4, sent_at=at(1, 9), sequence_id=sequence.id, sender=sender
    )
    b, (d4, _d5) = make_sent_emailing(
        session, recipients=2, sent_at=at(5, 14), sender=sender, first_contact=10
    )
    old, (d6,) = make_sent_emailing(
        session,
        recipients=1,
        sent_at=datetime(2026, 11, 2, 9, tzinfo=UTC),
        sender=sender,
        first_contact=20,
    )
    sale = "https://shop.example.com/sale"
    shoes = "https://shop.example.com/shoes?size=42&amp=1"
    sale_id = links.link_id_for(session, a.id, sale)
    shoes_id = links.link_id_for(session, a.id, shoes)
    counters.record_bounce(
        session, session.get(Delivery, d3.id), "550 unknown user", now=at(1, 9, 1)
    )
    # The factory counted d3 as sent; a bounced message never was.
    session.get(Emailing, a.id).sent -= 1
    session.commit()

    ingest.write_events(
        engine,
        [
            _event(TrackingKind.OPEN, d1, at(1, 9, 30), agent="Mozilla/5.0"),
            _event(TrackingKind.OPEN, d0, at(1, 10, 5)),
            _event(TrackingKind.OPEN, d0, at(1, 10, 40)),
            _event(TrackingKind.CLICK, d0, at(1, 11, 10), link_id=sale_id),
        ],
    )
    ingest.write_events(
        engine,
        [
            _event(TrackingKind.CLICK, d2, at(2, 8), link_id=shoes_id),
            _event(TrackingKind.OPEN, d4, at(5, 23, 30)),
            _event(TrackingKind.OPEN, d6, datetime(2026, 11, 2, 10, tzinfo=UTC)),
        ],
    )
    counters.unsubscribe(session, d2.id, now=at(2, 8, 5))
    session.commit()
    return DataSet(a, b, old, sequence, group, sale, shoes)


def test_figures_count_all_activity(session: Session, data: DataSet) -> None:
    result = stats.figures(session, start=START, end=END)

    assert {k: result[k] for k in ("recipients", "sent", "delivered", "bounced")} == {
        "recipients": 6,
        "sent": 6,
        "delivered": 5,
        "bounced": 1,
    }
    assert (result["opened"], result["clicked"], result["unsubscribed"]) == (4, 2, 1)
    assert (result["opens"], result["clicks"]) == (4, 2)
    assert (result["machine_opens"], result["machine_clicks"]) == (1, 0)
    assert result["open_rate"] == {"numerator": 4, "denominator": 5, "rate": 0.8}
    assert result["click_rate"] == {"numerator": 2, "denominator": 5, "rate": 0.4}
    assert result["click_to_open_rate"] == {
        "numerator": 2,
        "denominator": 4,
        "rate": 0.5,
    }
    assert result["unsubscribe_rate"]["rate"] == pytest.approx(0.2)
    assert result["bounce_rate"] == {
        "numerator": 1,
        "denominator": 6,
        "rate": pytest.approx(1 / 6),
    }


def test_figures_for_people_only_leave_out_the_privacy_proxy(
    session: Session, data: DataSet
) -> None:
    result = stats.figures(session, start=START, end=END, human_only=True)

    assert (result["opened"], result["clicked"]) == (3, 2)
    assert (result["opens"], result["clicks"]) == (3, 2)
    assert result["machine_opens"] == 1
    assert result["open_rate"]["numerator"] == 3
    assert result["click_to_open_rate"]["rate"] == pytest.approx(2 / 3)


def test_figures_without_any_send_are_zero_not_errors(
    session: Session, data: DataSet
) -> None:
    result = stats.figures(
        session,
        start=datetime(2027, 1, 1, tzinfo=UTC),
        end=datetime(2027, 2, 1, tzinfo=UTC),
    )

    assert result["sent"] == result["opened"] == result["opens"] == 0
    for name in stats.RATES:
        assert result[name] == {"numerator": 0, "denominator": 0, "rate": 0.0}


def test_figures_follow_the_emailing_sequence_and_group_filters(
    session: Session, data: DataSet
) -> None:
    one = stats.figures(session, emailing_id=data.b.id)
    by_sequence = stats.figures(session, sequence_id=data.sequence.id)
    by_group = stats.figures(session, start=START, end=END, group_id=data.group.id)

    assert (one["recipients"], one["opened"]) == (2, 1)
    assert (by_sequence["recipients"], by_sequence["opened"]) == (4, 3)
    assert by_group["recipients"] == 4


def test_activity_per_hour_shows_each_hour_of_the_range(
    session: Session, data: DataSet
) -> None:
    frame = stats.activity_over_time(
        session, start=at(1, 9), end=at(1, 12), bucket="hour"
    )

    assert frame.to_dict("records") == [
        {"bucket": pd.Timestamp(at(1, 9)), "opens": 1, "clicks": 0},
        {"bucket": pd.Timestamp(at(1, 10)), "opens": 2, "clicks": 0},
        {"bucket": pd.Timestamp(at(1, 11)), "opens": 0, "clicks": 1},
    ]


def test_activity_per_day_uses_the_users_days(session: Session, data: DataSet) -> None:
    frame = stats.activity_over_time(
        session, start=START, end=END, bucket="day", timezone="Europe/Paris"
    )

    # Paris is UTC+1 in December: each day starts at 23:00 UTC the day before.
    days = [pd.Timestamp(datetime(2026, 11, 30 + n, 23, tzinfo=UTC)) for n in (0,)]
    days += [pd.Timestamp(at(n, 23)) for n in range(1, 6)]
    assert frame["bucket"].tolist() == days
    assert frame["opens"].tolist() == [3, 0, 0, 0, 0, 1]
    assert frame["clicks"].tolist() == [1, 1, 0, 0, 0, 0]


def test_activity_people_only_and_auto_bucket(session: Session, data: DataSet) -> None:
    frame = stats.activity_over_time(
        session, start=at(1, 0), end=at(2, 0), human_only=True
    )

    assert frame["opens"].sum() == 2
    assert frame["bucket"].iloc[0] == pd.Timestamp(at(1, 9))


def test_activity_refuses_an_unknown_bucket(session: Session, data: DataSet) -> None:
    with pytest.raises(ValueError, match="bucket must be 'hour', 'day' or 'auto'"):
        stats.activity_over_time(session, bucket="week")


def test_emailing_comparison_has_one_row_per_emailing_newest_first(
    session: Session, data: DataSet
) -> None:
    frame = stats.emailing_comparison(session, start=START, end=END)

    assert frame["id"].tolist() == [data.b.id, data.a.id]
    row = frame.set_index("id").loc[data.a.id]
    assert row["sequence"] == "Welcome"
    assert (row["delivered"], row["opened"], row["clicked"]) == (3, 3, 2)
    assert row["open_rate"] == pytest.approx(1.0)
    assert row["bounce_rate"] == pytest.approx(0.25)
    empty = frame.set_index("id").loc[data.b.id]
    assert (empty["opened"], empty["clicks"], empty["click_to_open_rate"]) == (1, 0, 0)


def test_per_sequence_groups_emailings_by_their_sequence(
    session: Session, data: DataSet
) -> None:
    frame = stats.per_sequence(session, start=START, end=END, human_only=True)

    assert frame["sequence"].tolist() == ["Welcome", None]
    assert frame["emailings"].tolist() == [1, 1]
    assert frame["opened"].tolist() == [2, 1]
    assert frame["open_rate"].tolist() == pytest.approx([2 / 3, 1 / 2])


def test_top_links_ranks_urls_by_clicks(session: Session, data: DataSet) -> None:
    frame = stats.top_links(session, start=START, end=END)

    assert frame.to_dict("records") == [
        {"url": data.link_sale, "clicks": 1, "recipients": 1, "emailings": 1},
        {"url": data.link_shoes, "clicks": 1, "recipients": 1, "emailings": 1},
    ]


def test_emailings_table_lists_counters_and_rates(
    session: Session, data: DataSet
) -> None:
    frame = stats.emailings_table(session).set_index("id")

    row = frame.loc[data.a.id]
    assert (row["open"], row["click"], row["unsubscribe"], row["bounce"]) == (
        2,
        2,
        1,
        1,
    )
    assert row["sequence"] == "Welcome"
    assert row["status"] == "sent"
    assert row["ctor"] == pytest.approx(1.0)
    assert row["open_rate"] == pytest.approx(2 / row["sent"])
    assert len(frame) == 3


def test_recipients_and_events_of_one_emailing(session: Session, data: DataSet) -> None:
    people = stats.recipients(session, data.a.id)
    events = stats.recipient_events(session, data.a.id)

    assert people["opens"].tolist() == [2, 1, 0, 0]
    assert people["status"].tolist() == ["sent", "sent", "sent", "bounced"]
    assert events["kind"].tolist()[0] == "unsubscribe"
    assert events["machine"].sum() == 1
    assert len(events) == 7


def test_recompute_rebuilds_the_rollup_and_counters_the_writer_kept(
    session: Session, data: DataSet
) -> None:
    def snapshot():
        hours = session.exec(
            select(TrackingHour).order_by(
                TrackingHour.emailing_id,
                TrackingHour.hour,
                TrackingHour.kind,
                TrackingHour.machine,
            )
        ).all()
        return [(h.emailing_id, h.hour, h.kind, h.machine, h.events) for h in hours]

    def link_clicks():
        rows = session.exec(select(Link).order_by(Link.id)).all()
        return [(link.clicks, link.machine_clicks) for link in rows]

    kept, kept_links = snapshot(), link_clicks()
    session.expire_all()
    emailing = session.get(Emailing, data.a.id)
    names = ("open", "click", "unsubscribe", "bounce", "open_any", "click_any")
    live = {name: getattr(emailing, name) for name in names}

    result = counters.recompute_counters(session, data.a.id)
    session.commit()
    session.expire_all()

    assert snapshot() == kept
    assert link_clicks() == kept_links == [(1, 0), (1, 0)]
    assert result == live
    assert live == {
        "open": 2,
        "click": 2,
        "unsubscribe": 1,
        "bounce": 1,
        "open_any": 3,
        "click_any": 2,
    }
