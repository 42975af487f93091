"""The tracking endpoints over real HTTP: uvicorn on loopback, httpx as client."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import Session, select

from sequencer import links, machines, recorder, tokens, tracking
from sequencer.enums import ContactStatus, DeliveryStatus, TrackingKind
from sequencer.models import Contact, Delivery, Emailing, TrackingEvent
from sequencer.recipients import resolve_recipients
from sequencer.timeutil import utcnow
from tests.delivery_factories import add_contacts, add_emailing, add_list, add_sender
from tests.live_server import serve
from tests.tracking_factories import make_sent_emailing

SENT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
BROWSER = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
SHOP_URL = "https://shop.example.com/sale?a=1&b=2#winter"


@pytest.fixture
def server(engine: Engine) -> Iterator[str]:
    """The tracking app on a free port; the writer stops with it."""
    with serve(tracking.tracking_app()) as base_url:
        yield base_url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    headers = {"User-Agent": BROWSER}
    with httpx.Client(headers=headers, follow_redirects=False, timeout=10) as client:
        yield client


@pytest.fixture
def sent(session: Session) -> tuple[Emailing, list[Delivery]]:
    return make_sent_emailing(session, recipients=3, sent_at=SENT)


def _path(url: str) -> str:
    """The path of a tracking URL, to send to the test server."""
    return "/" + url.split("/", 3)[3]


def _events(engine: Engine, kind: TrackingKind | None = None) -> list[TrackingEvent]:
    tracking.flush_writer()
    with Session(engine) as session:
        statement = select(TrackingEvent).order_by(TrackingEvent.id)
        if kind is not None:
            statement = statement.where(TrackingEvent.kind == kind)
        return list(session.exec(statement).all())


def _emailing(engine: Engine, emailing_id: int) -> Emailing:
    tracking.flush_writer()
    with Session(engine) as session:
        return session.get(Emailing, emailing_id)


def _link(engine: Engine, emailing_id: int, url: str) -> int:
    with Session(engine) as session:
        link_id = links.link_id_for(session, emailing_id, url)
        session.commit()
    return link_id


# --- Open -------------------------------------------------------------------------


def test_open_returns_an_uncached_pixel_and_records_one_open(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent

    response = client.get(server + _path(tokens.open_url(deliveries[0].id)))

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.content == tracking.PIXEL
    assert "no-store" in response.headers["cache-control"]
    assert response.headers["pragma"] == "no-cache"
    events = _events(engine)
    assert [(e.kind, e.delivery_id, e.machine) for e in events] == [
        ("open", deliveries[0].id, False)
    ]
    assert events[0].user_agent == BROWSER
    assert events[0].emailing_id == emailing.id
    assert len(events[0].client_hash) == 32 and "127.0.0" not in events[0].client_hash
    assert _emailing(engine, emailing.id).open == 1


def test_repeated_opens_count_the_recipient_once(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    url = server + _path(tokens.open_url(deliveries[1].id))

    for _ in range(3):
        client.get(url)

    assert len(_events(engine, TrackingKind.OPEN)) == 3
    assert _emailing(engine, emailing.id).open == 1


def test_head_on_the_pixel_records_nothing(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    _, deliveries = sent

    response = client.head(server + _path(tokens.open_url(deliveries[0].id)))

    assert response.status_code == 200
    assert _events(engine) == []


@pytest.mark.parametrize(
    "token",
    ["forged", "WzFd.AAAAAAAAAAAAAAAAAAAAAAAAAAA", "WzFd", ""],
)
def test_forged_open_token_gets_404_and_records_nothing(
    engine: Engine, client: httpx.Client, server: str, sent, token: str
) -> None:
    response = client.get(f"{server}/t/o/{token}")

    assert response.status_code == 404
    assert _events(engine) == []


def test_altered_open_token_gets_404(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    _, deliveries = sent
    token = _path(tokens.open_url(deliveries[0].id)).rsplit("/", 1)[1]
    other = _path(tokens.open_url(deliveries[1].id)).rsplit("/", 1)[1]
    swapped = other.split(".")[0] + "." + token.split(".")[1]

    response = client.get(f"{server}/t/o/{swapped}")

    assert response.status_code == 404
    assert _events(engine) == []


def test_click_token_on_the_open_path_gets_404(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    link_id = _link(engine, emailing.id, SHOP_URL)
    token = tokens.click_url(deliveries[0].id, link_id).rsplit("/", 1)[1]

    response = client.get(f"{server}/t/o/{token}")

    assert response.status_code == 404
    assert _events(engine) == []


def test_test_send_open_is_served_and_not_recorded(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, _ = sent

    response = client.get(server + _path(tokens.open_url_for_test(emailing.id)))

    assert response.status_code == 200
    assert response.content == tracking.PIXEL
    assert _events(engine) == []
    assert _emailing(engine, emailing.id).open == 0


def test_open_through_apple_privacy_proxy_is_flagged_and_not_counted(
    engine: Engine, server: str, sent
) -> None:
    emailing, deliveries = sent
    headers = {"User-Agent": "Mozilla/5.0", "X-Forwarded-For": "17.58.101.3"}

    httpx.get(server + _path(tokens.open_url(deliveries[0].id)), headers=headers)

    events = _events(engine)
    assert [(e.machine, e.machine_reason) for e in events] == [
        (True, machines.APPLE_PRIVACY)
    ]
    assert _emailing(engine, emailing.id).open == 0


def test_open_through_google_image_proxy_is_flagged(
    engine: Engine, server: str, sent
) -> None:
    _, deliveries = sent
    agent = (
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
        "(via ggpht.com GoogleImageProxy)"
    )

    httpx.get(
        server + _path(tokens.open_url(deliveries[0].id)),
        headers={"User-Agent": agent},
    )

    assert [e.machine_reason for e in _events(engine)] == [machines.GOOGLE_PROXY]


def test_open_of_a_deleted_delivery_records_nothing(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    response = client.get(server + _path(tokens.open_url(999_999)))

    assert response.status_code == 200
    assert _events(engine) == []


# --- Click ------------------------------------------------------------------------


def test_click_redirects_to_the_stored_url_and_counts_click_and_open(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    link_id = _link(engine, emailing.id, SHOP_URL)

    response = client.get(server + _path(tokens.click_url(deliveries[0].id, link_id)))

    assert response.status_code == 302
    assert response.headers["location"] == SHOP_URL
    assert "no-store" in response.headers["cache-control"]
    events = _events(engine)
    assert [(e.kind, e.link_id, e.machine) for e in events] == [
        ("click", link_id, False)
    ]
    counted = _emailing(engine, emailing.id)
    assert (counted.open, counted.click) == (1, 1)


def test_open_after_a_click_does_not_count_a_second_open(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    link_id = _link(engine, emailing.id, SHOP_URL)

    client.get(server + _path(tokens.click_url(deliveries[0].id, link_id)))
    tracking.flush_writer()
    client.get(server + _path(tokens.open_url(deliveries[0].id)))

    counted = _emailing(engine, emailing.id)
    assert (counted.open, counted.click) == (1, 1)
    with Session(engine) as session:
        delivery = session.get(Delivery, deliveries[0].id)
    assert delivery.first_click_at is not None
    assert delivery.first_open_at is not None


def test_redirect_keeps_query_fragment_and_percent_encoding(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    url = "https://shop.example.com/a%2Fb/?q=x+y&next=%2Fcart&empty=#frag?not=query"
    link_id = _link(engine, emailing.id, url)

    response = client.get(server + _path(tokens.click_url(deliveries[0].id, link_id)))

    assert response.headers["location"] == url


def test_redirect_encodes_non_ascii_as_browsers_do(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    link_id = _link(engine, emailing.id, "https://café.example/thé?q=été#été")

    response = client.get(server + _path(tokens.click_url(deliveries[0].id, link_id)))

    assert response.headers["location"] == (
        "https://xn--caf-dma.example/th%C3%A9?q=%C3%A9t%C3%A9#%C3%A9t%C3%A9"
    )


def test_click_on_a_link_of_another_emailing_gets_404(
    engine: Engine, client: httpx.Client, server: str, session: Session, sent
) -> None:
    _, deliveries = sent
    other, _ = make_sent_emailing(session, recipients=1, sent_at=SENT, first_contact=9)
    foreign_link = _link(engine, other.id, "https://evil.example/phish")

    response = client.get(
        server + _path(tokens.click_url(deliveries[0].id, foreign_link))
    )

    assert response.status_code == 404
    assert "location" not in response.headers
    assert _events(engine) == []


@pytest.mark.parametrize(
    "path",
    [
        "/t/c/forged?url=https://evil.example/",
        "/t/c/WzEsMV0.AAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "/t/c/https://evil.example/",
        "/t/c/%2F%2Fevil.example",
    ],
)
def test_open_redirect_attempts_get_404(
    engine: Engine, client: httpx.Client, server: str, sent, path: str
) -> None:
    response = client.get(server + path)

    assert response.status_code == 404
    assert "location" not in response.headers
    assert _events(engine) == []


def test_click_on_an_unknown_link_id_gets_404(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    _, deliveries = sent

    response = client.get(server + _path(tokens.click_url(deliveries[0].id, 424242)))

    assert response.status_code == 404
    assert _events(engine) == []


def test_test_send_click_redirects_and_records_nothing(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, _ = sent
    link_id = _link(engine, emailing.id, SHOP_URL)

    response = client.get(
        server + _path(tokens.click_url_for_test(emailing.id, link_id))
    )

    assert response.status_code == 302
    assert response.headers["location"] == SHOP_URL
    assert _events(engine) == []


def test_test_send_click_cannot_reach_another_emailings_link(
    engine: Engine, client: httpx.Client, server: str, session: Session, sent
) -> None:
    emailing, _ = sent
    other, _ = make_sent_emailing(session, recipients=1, sent_at=SENT, first_contact=9)
    foreign_link = _link(engine, other.id, "https://evil.example/phish")

    response = client.get(
        server + _path(tokens.click_url_for_test(emailing.id, foreign_link))
    )

    assert response.status_code == 404


def test_head_on_a_click_redirects_without_recording(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    link_id = _link(engine, emailing.id, SHOP_URL)

    response = client.head(server + _path(tokens.click_url(deliveries[0].id, link_id)))

    assert response.status_code == 302
    assert _events(engine) == []


def test_click_seconds_after_delivery_without_open_is_a_scanner(
    engine: Engine, client: httpx.Client, server: str, session: Session
) -> None:
    emailing, deliveries = make_sent_emailing(session, recipients=1, sent_at=utcnow())
    link_id = _link(engine, emailing.id, SHOP_URL)

    client.get(server + _path(tokens.click_url(deliveries[0].id, link_id)))

    assert [e.machine_reason for e in _events(engine)] == [machines.TOO_SOON]
    counted = _emailing(engine, emailing.id)
    assert (counted.open, counted.click) == (0, 0)


def test_click_right_after_an_open_is_a_person(
    engine: Engine, client: httpx.Client, server: str, session: Session
) -> None:
    emailing, deliveries = make_sent_emailing(session, recipients=1, sent_at=utcnow())
    link_id = _link(engine, emailing.id, SHOP_URL)

    client.get(server + _path(tokens.open_url(deliveries[0].id)))
    client.get(server + _path(tokens.click_url(deliveries[0].id, link_id)))

    assert [e.machine for e in _events(engine)] == [False, False]
    counted = _emailing(engine, emailing.id)
    assert (counted.open, counted.click) == (1, 1)


def test_every_link_clicked_at_once_is_flagged_and_uncounted(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    link_ids = [
        _link(engine, emailing.id, f"https://shop.example.com/{n}") for n in range(3)
    ]

    # The first click is written alone, counted, then taken back by the burst.
    client.get(server + _path(tokens.click_url(deliveries[0].id, link_ids[0])))
    assert _emailing(engine, emailing.id).click == 1
    for link_id in link_ids[1:]:
        client.get(server + _path(tokens.click_url(deliveries[0].id, link_id)))

    events = _events(engine)
    assert [e.machine_reason for e in events] == [machines.EVERY_LINK] * 3
    counted = _emailing(engine, emailing.id)
    assert (counted.open, counted.click) == (0, 0)


def test_scanner_user_agent_click_is_flagged(engine: Engine, server: str, sent) -> None:
    emailing, deliveries = sent
    link_id = _link(engine, emailing.id, SHOP_URL)

    httpx.get(
        server + _path(tokens.click_url(deliveries[0].id, link_id)),
        headers={"User-Agent": "Mozilla/5.0 (compatible; Barracuda Sentinel)"},
    )

    assert [e.machine_reason for e in _events(engine)] == [machines.SCANNER_AGENT]
    assert _emailing(engine, emailing.id).click == 0


# --- Unsubscribe --------------------------------------------------------------------


def _contact(engine: Engine, delivery: Delivery) -> Contact:
    with Session(engine) as session:
        return session.get(Contact, delivery.contact_id)


def test_unsubscribe_get_shows_a_confirm_form_and_changes_nothing(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent

    response = client.get(server + _path(tokens.unsubscribe_url(deliveries[0].id)))

    assert response.status_code == 200
    assert '<form method="post">' in response.text
    assert "p***@example.com" in response.text
    assert "<button" in response.text
    assert _contact(engine, deliveries[0]).status == ContactStatus.SUBSCRIBED
    assert _emailing(engine, emailing.id).unsubscribe == 0
    assert _events(engine) == []


def test_unsubscribe_head_changes_nothing(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent

    response = client.head(server + _path(tokens.unsubscribe_url(deliveries[0].id)))

    assert response.status_code == 200
    assert _contact(engine, deliveries[0]).status == ContactStatus.SUBSCRIBED
    assert _emailing(engine, emailing.id).unsubscribe == 0


def test_confirm_button_post_unsubscribes_at_once(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    url = server + _path(tokens.unsubscribe_url(deliveries[0].id))

    response = client.post(url, data={"List-Unsubscribe": "One-Click"})

    assert response.status_code == 200
    assert "You are unsubscribed" in response.text
    contact = _contact(engine, deliveries[0])
    assert contact.status == ContactStatus.UNSUBSCRIBED
    assert contact.unsubscribed_at is not None
    with Session(engine) as session:
        assert session.get(Delivery, deliveries[0].id).unsubscribed_at is not None
    assert _emailing(engine, emailing.id).unsubscribe == 1
    assert [e.kind for e in _events(engine)] == ["unsubscribe"]


def test_one_click_post_from_a_mail_provider_unsubscribes(
    engine: Engine, server: str, sent
) -> None:
    emailing, deliveries = sent

    response = httpx.post(
        server + _path(tokens.unsubscribe_url(deliveries[1].id)),
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    assert response.status_code == 200
    assert _contact(engine, deliveries[1]).status == ContactStatus.UNSUBSCRIBED
    assert _emailing(engine, emailing.id).unsubscribe == 1


def test_second_unsubscribe_counts_once(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    url = server + _path(tokens.unsubscribe_url(deliveries[0].id))

    client.post(url)
    client.post(url)
    page = client.get(url)

    assert _emailing(engine, emailing.id).unsubscribe == 1
    assert len(_events(engine, TrackingKind.UNSUBSCRIBE)) == 1
    assert "You are unsubscribed" in page.text
    assert "<form" not in page.text


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD"])
def test_forged_unsubscribe_token_gets_404_and_changes_nothing(
    engine: Engine, client: httpx.Client, server: str, sent, method: str
) -> None:
    emailing, deliveries = sent
    open_token = _path(tokens.open_url(deliveries[0].id)).rsplit("/", 1)[1]

    forged = client.request(method, f"{server}/t/u/WzFd.forgedsignature")
    wrong_kind = client.request(method, f"{server}/t/u/{open_token}")

    assert (forged.status_code, wrong_kind.status_code) == (404, 404)
    assert _contact(engine, deliveries[0]).status == ContactStatus.SUBSCRIBED
    assert _emailing(engine, emailing.id).unsubscribe == 0


def test_test_send_unsubscribe_unsubscribes_no_one(
    engine: Engine, client: httpx.Client, server: str, sent
) -> None:
    emailing, deliveries = sent
    url = server + _path(tokens.unsubscribe_url_for_test(emailing.id))

    page = client.get(url)
    response = client.post(url, content=b"List-Unsubscribe=One-Click")

    assert page.status_code == response.status_code == 200
    assert "test message" in response.text
    with Session(engine) as session:
        statuses = session.exec(select(Contact.status)).all()
    assert set(statuses) == {ContactStatus.SUBSCRIBED}
    assert _emailing(engine, emailing.id).unsubscribe == 0


# --- Writer, bounces, recomputing ------------------------------------------------


def test_stopping_the_server_writes_every_queued_event(engine: Engine, sent) -> None:
    emailing, deliveries = sent
    paths = [_path(tokens.open_url(d.id)) for d in deliveries] * 100

    with (
        serve(tracking.tracking_app()) as base_url,
        httpx.Client(base_url=base_url, headers={"User-Agent": BROWSER}) as client,
    ):
        for path in paths:
            assert client.get(path).status_code == 200

    with Session(engine) as session:
        stored = session.exec(select(func.count(TrackingEvent.id))).one()
        counted = session.get(Emailing, emailing.id)
    assert stored == len(paths) == 300
    assert counted.open == 3


def test_record_bounce_marks_delivery_and_contact_once(
    engine: Engine, session: Session, sent
) -> None:
    emailing, deliveries = sent
    delivery = session.get(Delivery, deliveries[2].id)
    when = datetime(2026, 12, 1, 9, 1, tzinfo=UTC)

    first = tracking.record_bounce(
        session, delivery, "550 5.1.1 no such user", now=when
    )
    again = tracking.record_bounce(session, delivery, "550 again", now=when)
    session.commit()

    assert (first, again) == (True, False)
    session.refresh(delivery)
    assert delivery.status == DeliveryStatus.BOUNCED
    assert delivery.smtp_reply == "550 5.1.1 no such user"
    assert _contact(engine, delivery).status == ContactStatus.BOUNCED
    assert _emailing(engine, emailing.id).bounce == 1
    assert [e.kind for e in _events(engine)] == ["bounce"]


def test_recompute_counters_agrees_with_the_live_counters(
    engine: Engine, client: httpx.Client, server: str, session: Session, sent
) -> None:
    emailing, deliveries = sent
    link_id = _link(engine, emailing.id, SHOP_URL)
    client.get(server + _path(tokens.open_url(deliveries[0].id)))
    client.get(server + _path(tokens.click_url(deliveries[1].id, link_id)))
    client.get(
        server + _path(tokens.open_url(deliveries[2].id)),
        headers={"User-Agent": "Mozilla/5.0", "X-Forwarded-For": "17.1.2.3"},
    )
    client.post(server + _path(tokens.unsubscribe_url(deliveries[2].id)))
    live = _emailing(engine, emailing.id)

    # Counters wrong on purpose: recomputing restores them from the events.
    with Session(engine) as other:
        other.get(Emailing, emailing.id).open = 99
        other.commit()
    counters = tracking.recompute_counters(session, emailing.id)
    session.commit()

    assert counters == {
        "open": 2,
        "click": 1,
        "unsubscribe": 1,
        "bounce": 0,
        "open_any": 3,
        "click_any": 1,
    }
    assert (live.open, live.click, live.unsubscribe) == (2, 1, 1)
    assert (live.open_any, live.click_any) == (3, 1)
    assert _emailing(engine, emailing.id).open == 2


def test_writer_flush_without_lifespan_starts_it_lazily(engine: Engine, sent) -> None:
    _, deliveries = sent
    event = recorder.PendingEvent(
        TrackingKind.OPEN,
        deliveries[0].id,
        None,
        SENT + timedelta(hours=1),
        BROWSER,
        "192.0.2.10",
    )

    recorder.submit(event)
    assert tracking.flush_writer()
    tracking.stop_writer()

    stored = _events(engine)
    assert [(e.kind, e.occurred_at) for e in stored] == [
        ("open", SENT + timedelta(hours=1))
    ]


def test_unsubscribed_contact_is_left_out_of_the_next_emailing(
    engine: Engine, client: httpx.Client, server: str, session: Session
) -> None:
    sender = add_sender(session)
    contact_list = add_list(session)
    add_contacts(
        engine, ["stay@example.com", "leave@example.com"], list_id=contact_list.id
    )
    first = add_emailing(session, sender, lists=[contact_list.id])
    resolve_recipients(session, first, now=SENT)
    session.commit()
    leaving = session.exec(
        select(Delivery).where(Delivery.email == "leave@example.com")
    ).one()

    client.post(server + _path(tokens.unsubscribe_url(leaving.id)))
    second = add_emailing(session, sender, lists=[contact_list.id])
    resolve_recipients(session, second, now=SENT + timedelta(days=1))
    session.commit()

    addresses = session.exec(
        select(Delivery.email).where(Delivery.emailing_id == second.id)
    ).all()
    assert addresses == ["stay@example.com"]
