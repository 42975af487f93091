"""Finding and rewriting the links of an emailing's HTML for click tracking.

The HTML is edited in place rather than parsed and re-serialised, so
everything but the ``href`` values of tracked links reaches the recipient
byte for byte as the author wrote it. Only ``<a>`` tags whose ``href`` is an
http(s) URL are tracked; ``mailto:``, ``tel:``, ``#anchors`` and links marked
to skip (``data-notrack``, or SendGrid's ``clicktracking="off"``) are left
alone.

The URL stored for a link is the one the author meant: the ``href`` with its
HTML entities decoded (``&amp;`` is ``&``) and nothing else changed, so query
strings, fragments, percent-encoding and non-ASCII characters survive.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
from collections.abc import Callable, Sequence

from sqlmodel import Session, select

from sequencer.db import insert_ignoring_conflicts
from sequencer.models import Link

logger = logging.getLogger(__name__)

_ATTRIBUTE = r"""(?:\s+[^\s"'>/=]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)"""
_TAG_OR_COMMENT = re.compile(
    rf"<!--.*?-->|<a(?P<attributes>{_ATTRIBUTE}*)(?P<end>\s*/?>)",
    re.IGNORECASE | re.DOTALL,
)
"""An ``<a>`` start tag, possibly over several lines, or a comment to step over."""

_ATTRIBUTE_PARTS = re.compile(
    r"""(?P<space>\s+)(?P<name>[^\s"'>/=]+)"""
    r"""(?:(?P<equals>\s*=\s*)(?P<value>"[^"]*"|'[^']*'|[^\s"'=<>`]+))?""",
    re.DOTALL,
)

SKIP_ATTRIBUTES = ("data-notrack",)
"""An ``<a>`` with one of these attributes (any value) is never rewritten."""

_SKIP_VALUES = {"clicktracking": {"off", "false", "no", "0"}}

_TRACKED_SCHEMES = ("http://", "https://")
_URL_STRIP = " \t\n\r\f"
"""Browsers drop ASCII whitespace around an ``href``; so do we."""


def _href_of(attributes: str) -> tuple[re.Match[str] | None, bool]:
    """The ``href`` attribute of a tag and whether the tag is marked to skip.

    Only the first ``href`` counts, as in browsers.
    """
    href = None
    skip = False
    for part in _ATTRIBUTE_PARTS.finditer(attributes):
        name = part["name"].lower()
        value = _unquote(part["value"]) if part["value"] is not None else ""
        if name in SKIP_ATTRIBUTES:
            skip = True
        elif value.strip().lower() in _SKIP_VALUES.get(name, ()):
            skip = True
        elif name == "href" and href is None and part["value"] is not None:
            href = part
    return href, skip


def _unquote(raw: str) -> str:
    if raw[:1] in "\"'" and raw[-1:] == raw[:1] and len(raw) >= 2:
        return raw[1:-1]
    return raw


def trackable_url(raw_href: str) -> str | None:
    """The URL an href stands for if it is an http(s) link, else None."""
    url = html.unescape(raw_href).strip(_URL_STRIP)
    if not url.lower().startswith(_TRACKED_SCHEMES):
        return None
    return url


def _tracked_links(html_text: str):
    """Yield ``(match, href part, url)`` for each tag to rewrite."""
    for match in _TAG_OR_COMMENT.finditer(html_text):
        if match["attributes"] is None:
            continue
        href, skip = _href_of(match["attributes"])
        if skip or href is None:
            continue
        url = trackable_url(_unquote(href["value"]))
        if url is not None:
            yield match, href, url


def find_links(html_text: str) -> list[str]:
    """The distinct tracked URLs of an HTML body, in order of appearance."""
    seen: dict[str, None] = {}
    for _match, _href, url in _tracked_links(html_text):
        seen.setdefault(url, None)
    return list(seen)


def rewrite_links(html_text: str, url_for: Callable[[str], str]) -> str:
    """Replace each tracked link's href with ``url_for(url)``.

    ``url_for`` receives the URL as stored (entities decoded) and returns the
    tracking URL; it is called once per link occurrence, so callers that build
    Link rows should cache by URL. The quote style of each href is kept.
    """
    pieces: list[str] = []
    position = 0
    for match, href, url in _tracked_links(html_text):
        raw = href["value"]
        quote = raw[0] if raw[0] in "\"'" else '"'
        replacement = f"{quote}{html.escape(url_for(url), quote=True)}{quote}"
        start = match.start("attributes") + href.start("value")
        end = match.start("attributes") + href.end("value")
        pieces.append(html_text[position:start])
        pieces.append(replacement)
        position = end
    pieces.append(html_text[position:])
    return "".join(pieces)


_QUOTE_AWARE_TAG = re.compile(r"""<(?:"[^"]*"|'[^']*'|[^"'>])*>""")


def _markup(html_text: str) -> list[tuple[int, int]]:
    """Every stretch that could belong to a tag or a comment, generously.

    From each ``<``: to the first ``>``, to the first ``>`` outside quotes,
    and for a comment to its ``-->``, whichever goes furthest (to the end
    of the text when there is none).
    """
    spans = []
    for start in (match.start() for match in re.finditer("<", html_text)):
        ends = [html_text.find(">", start), -1]
        quoted = _QUOTE_AWARE_TAG.match(html_text, start)
        if quoted is not None:
            ends[1] = quoted.end()
        if html_text.startswith("<!--", start):
            close = html_text.find("-->", start + 4)
            ends.append(close + 3 if close >= 0 else -1)
        end = len(html_text) if -1 in ends else max(ends)
        spans.append((start, end))
    return spans


def _whole_hrefs(html_text: str) -> set[tuple[int, int]]:
    """The spans of the quoted ``href`` values of the ``<a>`` tags."""
    spans = set()
    for match in _TAG_OR_COMMENT.finditer(html_text):
        if match["attributes"] is None:
            continue
        offset = match.start("attributes")
        for part in _ATTRIBUTE_PARTS.finditer(match["attributes"]):
            raw = part["value"]
            if part["name"].lower() != "href" or raw is None or len(raw) < 2:
                continue
            if raw[0] in "\"'" and raw[-1] == raw[0]:
                start = offset + part.start("value") + 1
                spans.add((start, start + len(raw) - 2))
    return spans


def links_stay_put(
    html_text: str,
    holes: Sequence[tuple[int, int]],
    *,
    whole_hrefs: Sequence[tuple[int, int]] = (),
) -> bool:
    """True when filling the holes of ``html_text`` cannot change its links.

    A hole is a span to be replaced by HTML-escaped text: no ``<``, ``>`` nor
    quote. Links live in tags, so a hole in the text between tags leaves
    them as they are, and ``rewrite_links`` can run once on the HTML with its
    holes rather than once per filled copy. A hole of ``whole_hrefs`` may
    also be the whole quoted ``href`` of a link: the caller guarantees that
    ``rewrite_links`` would keep the value put there as it is.
    """
    markup = _markup(html_text)
    hrefs = _whole_hrefs(html_text) if whole_hrefs else set()
    for hole in holes:
        start, end = hole
        inside = any(first < end and start < last for first, last in markup)
        if inside and not (hole in whole_hrefs and hole in hrefs):
            return False
    return True


_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


def add_pixel(html_text: str, url: str) -> str:
    """Add the 1x1 open-tracking image just before ``</body>`` (or at the end)."""
    pixel = (
        f'<img src="{html.escape(url, quote=True)}" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0;" />'
    )
    ends = list(_BODY_END.finditer(html_text))
    if not ends:
        return html_text + pixel
    cut = ends[-1].start()
    return html_text[:cut] + pixel + html_text[cut:]


def url_hash(url: str) -> str:
    """The SHA-256 hex digest that makes a URL unique within an emailing."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def link_id_for(session: Session, emailing_id: int, url: str) -> int:
    """The id of the Link row of ``url`` in an emailing, created on first use.

    Safe when several senders of one emailing meet the same URL at once: the
    insert ignores a row that already exists, then the row is read back.
    The row is written in the caller's transaction.
    """
    digest = url_hash(url)
    statement = select(Link.id).where(
        Link.emailing_id == emailing_id, Link.url_hash == digest
    )
    link_id = session.exec(statement).first()
    if link_id is not None:
        return link_id

    created = insert_ignoring_conflicts(
        session,
        Link,
        {"emailing_id": emailing_id, "url": url, "url_hash": digest},
        conflict_columns=["emailing_id", "url_hash"],
    )
    link_id = session.exec(statement).one()
    if created:
        logger.info("emailing %s: link %s stored for %s", emailing_id, link_id, url)
    return link_id
