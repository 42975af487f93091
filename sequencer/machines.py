"""Telling machine activity from people in opens and clicks.

Some opens and clicks are not a person reading: Apple Mail Privacy Protection
and the Gmail and Yahoo image proxies fetch the pixel whether or not anyone
looks, and security scanners follow every link of a message as it arrives.
Such events are kept (they did happen, and an analyst may want "all opens")
but flagged with a reason, so statistics can count people only.

Each function returns the reason as a short phrase, or ``""`` for a person.
The rules are heuristics: they flag what is almost certainly a machine and
leave doubtful cases to people.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

APPLE_PRIVACY = "apple mail privacy protection"
GOOGLE_PROXY = "google image proxy"
YAHOO_PROXY = "yahoo image proxy"
SCANNER_AGENT = "security scanner"
BOT_AGENT = "automated client"
NO_AGENT = "no user agent"
TOO_SOON = "clicked seconds after delivery"
EVERY_LINK = "every link at once"

APPLE_NETWORKS = tuple(
    ipaddress.ip_network(network) for network in ("17.0.0.0/8", "2620:149::/32")
)
"""Apple's own address blocks, from which Mail Privacy Protection fetches."""

APPLE_PROXY_AGENT = "Mozilla/5.0"
"""The bare user agent of Apple's image prefetcher; no mail client sends it."""

_PROXY_AGENTS = (
    ("googleimageproxy", GOOGLE_PROXY),
    ("ggpht.com", GOOGLE_PROXY),
    ("yahoomailproxy", YAHOO_PROXY),
)

SCANNER_AGENTS = (
    "barracuda",
    "mimecast",
    "proofpoint",
    "ironport",
    "forcepoint",
    "messagelabs",
    "symantec",
    "trendmicro",
    "trend micro",
    "sophos",
    "fortinet",
    "fortiguard",
    "bitdefender",
    "zscaler",
    "cisco",
    "safelinks",
    "urlscan",
    "virustotal",
)
"""Substrings (lower case) of user agents sent by mail security products."""

BOT_AGENTS = (
    "googlebot",
    "bingbot",
    "bingpreview",
    "slackbot",
    "twitterbot",
    "discordbot",
    "telegrambot",
    "linkedinbot",
    "applebot",
    "whatsapp",
    "skypeuripreview",
    "facebookexternalhit",
    "crawler",
    "spider",
    "curl/",
    "wget/",
    "python-requests",
    "python-urllib",
    "go-http-client",
    "java/",
    "libwww-perl",
    "okhttp",
)
"""Substrings of user agents of link previews, crawlers and HTTP libraries.

Named one by one: a loose ``bot`` would also match phones such as Cubot.
"""

SCANNER_SECONDS = 10.0
"""A click this soon after delivery, with no open seen, is a scanner's."""

BURST_SECONDS = 2.0
"""Clicks of one recipient this close together are "at once"."""

BURST_LINKS = 3
"""This many different links clicked at once is a scanner, whatever the total."""


@lru_cache(maxsize=4096)
def classify_agent(user_agent: str) -> str:
    """The machine reason a user agent alone gives, or ``""``.

    Cached: a campaign's events come from a few hundred distinct agents.
    """
    agent = user_agent.strip()
    if not agent:
        return NO_AGENT
    if agent == APPLE_PROXY_AGENT:
        return APPLE_PRIVACY
    lowered = agent.lower()
    for marker, reason in _PROXY_AGENTS:
        if marker in lowered:
            return reason
    if any(marker in lowered for marker in SCANNER_AGENTS):
        return SCANNER_AGENT
    if any(marker in lowered for marker in BOT_AGENTS):
        return BOT_AGENT
    return ""


@lru_cache(maxsize=4096)
def classify_address(address: str | None) -> str:
    """The machine reason a client address alone gives, or ``""``."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    if any(ip in network for network in APPLE_NETWORKS):
        return APPLE_PRIVACY
    return ""


def classify_open(user_agent: str, address: str | None) -> str:
    """Why an open is a machine's (proxy, scanner, bot), or ``""`` for a person."""
    return classify_agent(user_agent) or classify_address(address)


def classify_click(
    user_agent: str,
    address: str | None,
    *,
    occurred_at: datetime,
    delivered_at: datetime | None,
    opened_before: bool,
) -> str:
    """Why a click is a machine's, or ``""`` for a person.

    Besides the agent, a click within seconds of delivery is a scanner's
    unless the recipient's image was already loaded: a person who opens and
    clicks at once loads the pixel first; a scanner does not.
    """
    reason = classify_agent(user_agent)
    if reason and reason not in (APPLE_PRIVACY, GOOGLE_PROXY, YAHOO_PROXY):
        return reason
    if address and classify_address(address) == APPLE_PRIVACY:
        return APPLE_PRIVACY
    if delivered_at is not None and not opened_before:
        delay = (occurred_at - delivered_at).total_seconds()
        if delay < SCANNER_SECONDS:
            return TOO_SOON
    return ""


@dataclass(frozen=True)
class Click:
    """One click of one recipient, as burst detection sees it."""

    event_id: int
    link_id: int | None
    occurred_at: datetime


def burst_clicks(clicks: Iterable[Click], *, link_count: int) -> set[int]:
    """Ids of clicks that belong to a burst: links followed all at once.

    ``clicks`` are one recipient's. A burst is a run of clicks, each within
    ``BURST_SECONDS`` of the previous, that covers ``BURST_LINKS`` different
    links, or every link of the emailing when it has at least two.
    """
    ordered = sorted(clicks, key=lambda click: (click.occurred_at, click.event_id))
    flagged: set[int] = set()
    run: list[Click] = []
    for click in ordered:
        gap = (click.occurred_at - run[-1].occurred_at).total_seconds() if run else 0.0
        if run and gap > BURST_SECONDS:
            flagged.update(_burst_ids(run, link_count))
            run = []
        run.append(click)
    flagged.update(_burst_ids(run, link_count))
    return flagged


def _burst_ids(run: Sequence[Click], link_count: int) -> set[int]:
    links = {click.link_id for click in run}
    enough = len(links) >= BURST_LINKS or (link_count >= 2 and len(links) >= link_count)
    return {click.event_id for click in run} if enough else set()
