"""End to end: an emailing goes out over SMTP, is read in Chromium, and counted.

The message is sent by the real delivery code to aiosmtpd on loopback; its
HTML is opened in headless Chromium, which loads the tracking pixel from the
running tracking server; a link is clicked, the redirect lands on the shop
page the author wrote, and the emailing's counters read open 1 and click 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from sequencer import config, delivery, tracking
from sequencer.models import Emailing, Link, TrackingEvent
from tests.delivery_factories import add_contacts, add_emailing, add_list, add_sender
from tests.live_server import serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin"
    ),
]


async def _shop_page(request: Request) -> HTMLResponse:
    return HTMLResponse(f"<h1>Shop</h1><p>{request.url.query}</p>")


@pytest.fixture
def shop() -> Iterator[str]:
    """The site the email links to, so the redirect has somewhere real to land."""
    with serve(Starlette(routes=[Route("/sale", _shop_page)])) as base_url:
        yield base_url


@pytest.fixture
def tracking_url(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The tracking server, whose address is the public URL of the links."""
    with serve(tracking.tracking_app()) as base_url:
        monkeypatch.setenv("SEQUENCER_PUBLIC_URL", base_url)
        config.get_settings.cache_clear()
        yield base_url


@pytest.fixture
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


def test_email_read_in_chromium_counts_one_open_and_one_click(
    engine: Engine,
    session: Session,
    smtp_server,
    shop: str,
    tracking_url: str,
    browser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEQUENCER_SMTP_URL", smtp_server.url)
    config.get_settings.cache_clear()
    sender = add_sender(session)
    contact_list = add_list(session)
    add_contacts(engine, ["reader@example.com"], list_id=contact_list.id)
    html = (
        "<html><body><p>Hello {contact.name},</p>"
        f'<p><a id="sale" href="{shop}/sale?a=1&amp;b=%C3%A9">Winter sale</a></p>'
        '<p><a href="mailto:help@shop.example.com">Write to us</a></p>'
        "</body></html>"
    )
    emailing = add_emailing(
        session, sender, lists=[contact_list.id], html=html, send_at=None
    )
    delivery.send_now(session, emailing.id)

    # Sent through the real delivery code into the SMTP server.
    assert delivery.dispatch_due() == 1
    assert smtp_server.wait_for(1) == 1
    (message,) = smtp_server.parsed("reader@example.com")
    body = message.get_body(preferencelist=("html",)).get_content()
    assert f"{tracking_url}/t/o/" in body
    assert f"{tracking_url}/t/c/" in body
    assert 'href="mailto:help@shop.example.com"' in body

    # Read in Chromium: the pixel loads with the page, then the link is clicked.
    page = browser.new_page()
    with page.expect_response(lambda r: "/t/o/" in r.url) as pixel:
        page.set_content(body, wait_until="load")
    assert pixel.value.status == 200
    with page.expect_navigation(url=f"{shop}/sale?a=1&b=%C3%A9"):
        page.click("#sale")
    assert page.inner_text("h1") == "Shop"
    page.close()

    # The counters, once the writer has stored what the server took.
    assert tracking.flush_writer()
    with Session(engine) as check:
        counted = check.get(Emailing, emailing.id)
        events = check.exec(select(TrackingEvent).order_by(TrackingEvent.id)).all()
        link = check.exec(select(Link)).one()
    assert (counted.open, counted.click) == (1, 1)
    assert [(e.kind, e.machine) for e in events] == [
        ("open", False),
        ("click", False),
    ]
    assert "HeadlessChrome" in events[0].user_agent
    assert link.url == f"{shop}/sale?a=1&b=%C3%A9"
