"""Machine activity: privacy proxies and scanners are told apart from people."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sequencer import machines
from sequencer.machines import Click

DELIVERED = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)
IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)


@pytest.mark.parametrize(
    ("agent", "address", "reason"),
    [
        ("Mozilla/5.0", "203.0.113.9", machines.APPLE_PRIVACY),
        (IPHONE_MAIL, "17.58.63.12", machines.APPLE_PRIVACY),
        (
            "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
            "(via ggpht.com GoogleImageProxy)",
            "66.249.84.1",
            machines.GOOGLE_PROXY,
        ),
        (
            "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy",
            None,
            "yahoo image proxy",
        ),
        ("", "198.51.100.7", machines.NO_AGENT),
        (
            "Mozilla/5.0 (compatible; Mimecast URL protect)",
            None,
            machines.SCANNER_AGENT,
        ),
        ("python-requests/2.32", None, machines.BOT_AGENT),
    ],
)
def test_machine_opens_are_flagged_with_a_reason(
    agent: str, address: str | None, reason: str
) -> None:
    assert machines.classify_open(agent, address) == reason


@pytest.mark.parametrize(
    "agent",
    [
        CHROME,
        IPHONE_MAIL,
        "Mozilla/5.0 (Linux; Android 9; CUBOT P30) AppleWebKit/537.36 Chrome/120.0",
        "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328)",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/131.0",
    ],
)
def test_mail_clients_and_browsers_are_people(agent: str) -> None:
    assert machines.classify_open(agent, "192.0.2.44") == ""


def test_unparseable_address_is_ignored() -> None:
    assert machines.classify_open(CHROME, "testclient") == ""


def test_click_seconds_after_delivery_without_an_open_is_a_scanner() -> None:
    reason = machines.classify_click(
        CHROME,
        "192.0.2.44",
        occurred_at=DELIVERED + timedelta(seconds=3),
        delivered_at=DELIVERED,
        opened_before=False,
    )

    assert reason == machines.TOO_SOON


def test_quick_click_after_an_open_is_a_person() -> None:
    reason = machines.classify_click(
        CHROME,
        "192.0.2.44",
        occurred_at=DELIVERED + timedelta(seconds=3),
        delivered_at=DELIVERED,
        opened_before=True,
    )

    assert reason == ""


def test_later_click_without_an_open_is_a_person_with_images_off() -> None:
    reason = machines.classify_click(
        CHROME,
        None,
        occurred_at=DELIVERED + timedelta(minutes=20),
        delivered_at=DELIVERED,
        opened_before=False,
    )

    assert reason == ""


def test_scanner_agent_click_is_flagged_whenever_it_comes() -> None:
    reason = machines.classify_click(
        "Barracuda Sentinel (EE)",
        None,
        occurred_at=DELIVERED + timedelta(days=2),
        delivered_at=DELIVERED,
        opened_before=True,
    )

    assert reason == machines.SCANNER_AGENT


def _clicks(*spec: tuple[int, int, float]) -> list[Click]:
    return [
        Click(event_id, link_id, DELIVERED + timedelta(seconds=offset))
        for event_id, link_id, offset in spec
    ]


def test_three_links_within_seconds_are_a_burst() -> None:
    clicks = _clicks((1, 10, 0), (2, 11, 0.4), (3, 12, 1.1))

    assert machines.burst_clicks(clicks, link_count=8) == {1, 2, 3}


def test_every_link_of_a_two_link_emailing_at_once_is_a_burst() -> None:
    clicks = _clicks((1, 10, 0), (2, 11, 0.5))

    assert machines.burst_clicks(clicks, link_count=2) == {1, 2}


def test_same_link_clicked_twice_quickly_is_a_person() -> None:
    clicks = _clicks((1, 10, 0), (2, 10, 0.3), (3, 10, 0.6))

    assert machines.burst_clicks(clicks, link_count=2) == set()


def test_links_clicked_minutes_apart_are_a_person() -> None:
    clicks = _clicks((1, 10, 0), (2, 11, 90), (3, 12, 200))

    assert machines.burst_clicks(clicks, link_count=3) == set()


def test_only_the_burst_is_flagged_not_later_clicks() -> None:
    clicks = _clicks((1, 10, 0), (2, 11, 0.2), (3, 12, 0.4), (4, 10, 600))

    assert machines.burst_clicks(clicks, link_count=5) == {1, 2, 3}
