"""The tracking endpoints: open pixel, click redirect and unsubscribe, under /t/.

Mounted on the dashboard's own server (``routes()`` given to ``st.App``) and
served alone by the headless worker (``tracking_app()``). Every request
carries a signed token (see ``tokens``); a token that is not genuine gets a
404 and records nothing. Test-send tokens work like real ones and record
nothing either.

Opens and clicks are queued for the background writer (``recorder``), so the
pixel answers without waiting for the database. An unsubscribe is written at
once, since the recipient is told it is done.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote, urlsplit

from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from sequencer.counters import recompute_counters, record_bounce, unsubscribe
from sequencer.db import get_engine, session_scope
from sequencer.enums import ContactStatus, TrackingKind
from sequencer.models import Contact, Delivery, Emailing, Link
from sequencer.recorder import (
    PendingEvent,
    flush_writer,
    start_writer,
    stop_writer,
    submit,
)
from sequencer.timeutil import utcnow
from sequencer.tokens import CLICK, OPEN, UNSUBSCRIBE, TokenPayload, read_token

__all__ = [
    "NO_CACHE",
    "PIXEL",
    "flush_writer",
    "location",
    "record_bounce",
    "recompute_counters",
    "routes",
    "start_writer",
    "stop_writer",
    "tracking_app",
]

logger = logging.getLogger(__name__)

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
"""A transparent 1x1 GIF, 43 bytes."""

NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, private",
    "Pragma": "no-cache",
    "Expires": "Thu, 01 Jan 1970 00:00:00 GMT",
}
"""Each open must reach us: no browser, proxy or CDN may keep a copy."""

_PAGE_HEADERS = {
    **NO_CACHE,
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
    ),
    "X-Robots-Tag": "noindex",
    "Referrer-Policy": "no-referrer",
}

_LOCATION_SAFE = ":/?#[]@!$&'()*+,;=%~"
"""Characters left as they are in a redirect; the rest is percent-encoded."""


def _not_found() -> Response:
    return PlainTextResponse("Not found", status_code=404, headers=NO_CACHE)


def _client(request: Request) -> tuple[str, str | None]:
    agent = request.headers.get("user-agent", "")
    return agent, request.client.host if request.client else None


# --- Open --------------------------------------------------------------------------


async def open_pixel(request: Request) -> Response:
    """The 1x1 image; a GET of a genuine token records an open."""
    payload = read_token(OPEN, request.path_params["token"])
    if payload is None:
        return _not_found()
    if not payload.test and request.method == "GET":
        agent, address = _client(request)
        submit(
            PendingEvent(
                TrackingKind.OPEN, payload.delivery_id, None, utcnow(), agent, address
            )
        )
    return Response(PIXEL, media_type="image/gif", headers=NO_CACHE)


# --- Click -------------------------------------------------------------------------


def _link_url(payload: TokenPayload) -> str | None:
    """The stored URL of the token's link, if it belongs to the token's emailing."""
    statement = select(Link.url).where(Link.id == payload.link_id)
    if payload.test:
        statement = statement.where(Link.emailing_id == payload.emailing_id)
    else:
        statement = statement.join(
            Delivery, Delivery.emailing_id == Link.emailing_id
        ).where(Delivery.id == payload.delivery_id)
    with Session(get_engine()) as session:
        return session.exec(statement).first()


def location(url: str) -> str:
    """A URL as a ``Location`` header: IDNA host, non-ASCII percent-encoded.

    Does what a browser does with the same href, and nothing more: existing
    percent-escapes, the query and the fragment are kept as written.
    """
    netloc = urlsplit(url).netloc
    if netloc and not netloc.isascii():
        userinfo, at, hostport = netloc.rpartition("@")
        host, colon, port = hostport.partition(":")
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_host = host
        url = url.replace(netloc, f"{userinfo}{at}{ascii_host}{colon}{port}", 1)
    return quote(url, safe=_LOCATION_SAFE)


async def click(request: Request) -> Response:
    """Redirect to the link's stored URL; a GET of a genuine token records it."""
    payload = read_token(CLICK, request.path_params["token"])
    if payload is None:
        return _not_found()
    url = await run_in_threadpool(_link_url, payload)
    if url is None:
        logger.warning("click token for unknown link %s refused", payload.link_id)
        return _not_found()
    if not payload.test and request.method == "GET":
        agent, address = _client(request)
        submit(
            PendingEvent(
                TrackingKind.CLICK,
                payload.delivery_id,
                payload.link_id,
                utcnow(),
                agent,
                address,
            )
        )
    headers = {**NO_CACHE, "Location": location(url), "Referrer-Policy": "no-referrer"}
    return Response(status_code=302, headers=headers)


# --- Unsubscribe -------------------------------------------------------------------


def _mask(email: str) -> str:
    """``j***@example.com``: enough to recognise, not to harvest a forwarded link."""
    local, at, domain = email.partition("@")
    return f"{local[:1]}***{at}{domain}" if at else "***"


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;"
        "padding:0 1rem;color:#222}button{font-size:1rem;padding:.6rem 1.2rem;"
        "border:0;border-radius:.3rem;background:#c0392b;color:#fff;cursor:pointer}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def _recipient(delivery_id: int) -> tuple[str, str, bool] | None:
    """Masked address, sender name, and whether they are already unsubscribed."""
    statement = (
        select(Delivery, Emailing.sender_name, Contact.status)
        .join(Emailing, Emailing.id == Delivery.emailing_id)
        .outerjoin(Contact, Contact.id == Delivery.contact_id)
        .where(Delivery.id == delivery_id)
    )
    with Session(get_engine()) as session:
        row = session.exec(statement).first()
    if row is None:
        return None
    delivery, sender_name, status = row
    done = delivery.unsubscribed_at is not None or status == ContactStatus.UNSUBSCRIBED
    return _mask(delivery.email), sender_name, done


def _confirm_page(payload: TokenPayload) -> Response:
    if payload.test:
        address, sender, done = "a test recipient", "", False
        note = (
            "<p>This link comes from a test message: no one will be unsubscribed.</p>"
        )
    else:
        found = _recipient(payload.delivery_id)
        if found is None:
            return _not_found()
        address, sender, done = found
        note = ""
    if done:
        return HTMLResponse(
            _page(
                "You are unsubscribed",
                f"<p>{html.escape(address)} no longer receives these emails.</p>",
            ),
            headers=_PAGE_HEADERS,
        )
    source = f" from {html.escape(sender)}" if sender else ""
    body = (
        f"<p>Stop sending emails{source} to {html.escape(address)}?</p>{note}"
        '<form method="post">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        "<button type=submit>Unsubscribe</button></form>"
    )
    return HTMLResponse(_page("Unsubscribe", body), headers=_PAGE_HEADERS)


def _unsubscribe_now(payload: TokenPayload, agent: str, address: str | None) -> bool:
    with session_scope() as session:
        done = unsubscribe(
            session, payload.delivery_id, user_agent=agent, address=address
        )
    return done is not None


async def unsubscribe_endpoint(request: Request) -> Response:
    """GET (and HEAD) show a confirm page; POST unsubscribes at once.

    Link scanners fetch every URL of a message, so a GET never unsubscribes;
    the page's button and mail providers' one-click requests (RFC 8058,
    body ``List-Unsubscribe=One-Click``) are POSTs.
    """
    payload = read_token(UNSUBSCRIBE, request.path_params["token"])
    if payload is None:
        return _not_found()
    if request.method != "POST":
        return await run_in_threadpool(_confirm_page, payload)

    if payload.test:
        body = "<p>This was a test message: no one was unsubscribed.</p>"
        return HTMLResponse(_page("Test message", body), headers=_PAGE_HEADERS)
    agent, address = _client(request)
    if not await run_in_threadpool(_unsubscribe_now, payload, agent, address):
        return _not_found()
    body = "<p>You will not receive these emails any more.</p>"
    return HTMLResponse(_page("You are unsubscribed", body), headers=_PAGE_HEADERS)


# --- Mounting -----------------------------------------------------------------------


def routes() -> list[BaseRoute]:
    """The tracking routes, for ``st.App(routes=...)`` and ``tracking_app``."""
    return [
        Route("/t/o/{token}", open_pixel, methods=["GET"], name="tracking_open"),
        Route("/t/c/{token}", click, methods=["GET"], name="tracking_click"),
        Route(
            "/t/u/{token}",
            unsubscribe_endpoint,
            methods=["GET", "POST"],
            name="tracking_unsubscribe",
        ),
    ]


@asynccontextmanager
async def writer_lifespan(_app: object) -> AsyncIterator[None]:
    """Run the event writer for as long as the server runs; flush it on exit."""
    start_writer()
    try:
        yield
    finally:
        await run_in_threadpool(stop_writer)


def tracking_app() -> Starlette:
    """The tracking routes alone, for the worker's own port."""
    return Starlette(routes=routes(), lifespan=writer_lifespan)
