"""The email one recipient receives, built with the standard library.

``email.message.EmailMessage`` with the ``SMTP`` policy does the encoding:
non-ASCII subjects and display names become RFC 2047 words (the address
itself is never encoded), bodies are UTF-8 with a transfer encoding that keeps
every line under 998 characters, and a header value can never spill into a
new header, since subjects and names are reduced to one line first.

An emailing is read once into a ``Draft``; ``compose`` then fills the
recipient variables of each message and, with tracking on, rewrites the links
and adds the open pixel. The fields are prepared once per emailing (variables
found, links rewritten around slots for each recipient's tokens), so a
message costs little more than its values and its signatures.

Sending thousands of messages that share most of their headers, the policy
parses and folds each distinct header value once (``header``) and the result
is reused; values built here from ASCII tokens (Message-ID, plain names and
subjects) are written as they are, which is what the policy would write. The
worker writes a message out from those folded headers and encoded parts
(``Composed.as_bytes``) rather than through the email package's generator;
the bytes are the generator's own, which ``tests/test_message.py`` checks
over accents, folding, long lines and line-end variants.
"""

from __future__ import annotations

import binascii
import copy
import html as html_lib
import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.header import Header
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime
from functools import lru_cache
from typing import Any

import html2text
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from sequencer import links, templating, tokens
from sequencer.config import get_settings
from sequencer.exceptions import SendError
from sequencer.models import Emailing
from sequencer.types import format_value

logger = logging.getLogger(__name__)


class _HeaderClasses(HeaderRegistry):
    """The standard header registry, building each header class only once.

    The stock registry makes a new class on every lookup, and the email
    package looks one up for every header it sets.
    """

    def __init__(self) -> None:
        super().__init__()
        self._built: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        built = self._built.get(key)
        if built is None:
            built = self._built[key] = super().__getitem__(name)
        return built


POLICY = policy.SMTP.clone(header_factory=_HeaderClasses())
"""CRLF line ends and folded headers of at most 78 characters."""

TEST_HEADER = "X-Sequencer-Test"
TEST_PREFIX = "[Test] "

_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_PLAIN_LINE = 78
"""Longest line sent as is; longer ones are quoted-printable encoded."""
_URL = re.compile(r"https?://[^\s<>\"']+[^\s<>\"'.,;:!?)\]]")


def one_line(value: str) -> str:
    """A header value on a single line: line breaks become spaces.

    A subject rendered from a record can contain a newline; folded into the
    header it would start a header of its own (``Bcc: ...``). Reduced to one
    line, it stays text of the subject.
    """
    value = _LINE_BREAKS.sub(" ", value)
    return _CONTROLS.sub("", value).strip()


def make_address(name: str, email: str) -> Address:
    """A mailbox with an encodable display name and a plain ASCII address.

    An address that is not plain ASCII ``local@domain`` is checked by
    email-validator, as contacts are when stored, and written with its
    IDNA 2008 domain (``straße.de`` is ``xn--strae-oqa.de``, not
    ``strasse.de``, another domain).
    """
    email = email.strip()
    local, _, domain = email.rpartition("@")
    if not local or not domain:
        raise SendError(f"address {email!r} is not an email address")
    if not local.isascii():
        raise SendError(f"address {email!r}: a non-ASCII mailbox needs SMTPUTF8")
    if "=?" in local:
        raise SendError(f"address {email!r}: its mailbox reads as an encoded word")
    if len(email) > 254 or not _PLAIN_ADDR_SPEC.fullmatch(email):
        try:
            checked = validate_email(email, check_deliverability=False)
        except EmailNotValidError as exc:
            raise SendError(f"address {email!r} is not valid: {exc}") from None
        local, domain = checked.ascii_local_part, checked.ascii_domain
    try:
        return Address(display_name=one_line(name), username=local, domain=domain)
    except (ValueError, IndexError) as exc:
        raise SendError(f"address {email!r} is not valid: {exc}") from exc


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_ADDR_SPEC = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
"""An ASCII dot-atom address with a host name: written as it is."""


def text_from_html(html: str) -> str:
    """The plain-text part of an emailing that was only written in HTML."""
    converter = html2text.HTML2Text()
    converter.body_width = 0
    converter.ignore_images = True
    converter.unicode_snob = True
    return converter.handle(html).strip() + "\n"


def html_from_text(text: str) -> str:
    """A minimal HTML part for an emailing written in plain text only.

    It keeps every email multipart/alternative and gives the open pixel and
    click tracking somewhere to live; URLs become links.
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    rendered = []
    for paragraph in paragraphs:
        escaped = html_lib.escape(paragraph)
        linked = _URL.sub(lambda m: f'<a href="{m[0]}">{m[0]}</a>', escaped)
        rendered.append("<p>" + linked.replace("\n", "<br>\n") + "</p>")
    body = "\n".join(rendered)
    return f"<!DOCTYPE html>\n<html><body>\n{body}\n</body></html>\n"


@dataclass(frozen=True)
class Composed:
    """One message with every header folded and both parts encoded.

    What is left is writing it out: ``message()`` gives the email package's
    ``EmailMessage`` and ``as_bytes()`` the bytes its generator writes for
    it. The worker sends the bytes; writing them from the folded pieces
    skips the generator's walk over the message tree, which costs as much as
    building the message itself, and a test checks both give the same bytes
    for the same message.
    """

    headers: list[FoldedHeader]
    parts: list[tuple[tuple[FoldedHeader, ...], str]]
    """The text and HTML parts: their headers and transfer-encoded body."""
    boundary: str
    recipient: Address

    @property
    def envelope_to(self) -> str:
        """The recipient's address as given to the server (RCPT TO)."""
        return self.recipient.addr_spec

    def message(self) -> EmailMessage:
        """The message as the email package's own object."""
        message = EmailMessage(policy=POLICY)
        for folded in self.headers:
            message[folded.name] = folded
        subparts = []
        for headers, body in self.parts:
            part = MIMEPart(policy=POLICY)
            for folded in headers:
                part[folded.name] = folded
            part.set_payload(body)
            subparts.append(part)
        message.set_payload(subparts)
        return message

    def as_bytes(self) -> bytes:
        """The bytes ``message().as_bytes()`` gives (RFC 2046 multipart).

        Headers are already folded with CRLF line ends and bodies are ASCII
        with ``\\n`` line ends (``_encoded_part``), so writing is joining.
        """
        crlf = POLICY.linesep
        delimiter = f"{crlf}--{self.boundary}{crlf}"
        parts = [
            "".join(folded.folded for folded in headers)
            + crlf
            + body.replace("\n", crlf)
            for headers, body in self.parts
        ]
        text = (
            "".join(folded.folded for folded in self.headers)
            + f"{crlf}--{self.boundary}{crlf}"
            + delimiter.join(parts)
            + f"{crlf}--{self.boundary}--{crlf}"
        )
        return text.encode("ascii")


def compose(
    *,
    subject: str,
    text: str,
    html: str,
    sender: Address,
    recipient: Address,
    reply_to: Address | None,
    message_id: str,
    date: datetime,
    unsubscribe: list[str] | None = None,
    headers: dict[str, str] | None = None,
    boundary: str | None = None,
) -> Composed:
    """Encode and fold one multipart/alternative message from finished parts.

    ``boundary`` may be shared by the messages of one emailing: it is random,
    so no body contains it, and a repeated value costs nothing to encode.
    """
    folded = [
        header("Subject", one_line(subject)),
        address_header("From", sender, cache=True),
        address_header("To", recipient),
    ]
    if reply_to is not None:
        folded.append(address_header("Reply-To", reply_to, cache=True))
    folded.append(_date_header(date.replace(microsecond=0)))
    folded.append(verbatim_header("Message-ID", message_id))
    if unsubscribe:
        folded.append(_UrlList("List-Unsubscribe", unsubscribe))
        if any(url.startswith(("https://", "http://")) for url in unsubscribe):
            folded.append(header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
    for name, value in (headers or {}).items():
        folded.append(header(name, one_line(value)))
    folded.append(header("MIME-Version", "1.0"))
    boundary = boundary or f"=_{secrets.token_hex(12)}"
    folded.append(
        header("Content-Type", f'multipart/alternative; boundary="{boundary}"')
    )
    return Composed(
        headers=folded,
        parts=[_encoded_part(text, "plain"), _encoded_part(html, "html")],
        boundary=boundary,
        recipient=recipient,
    )


@lru_cache(maxsize=8)
def _date_header(date: datetime) -> FoldedHeader:
    """The Date header of a second: the messages sent in it share one."""
    return header("Date", format_datetime(date), cache=False)


def _encoded_part(content: str, subtype: str) -> tuple[tuple[FoldedHeader, ...], str]:
    """The headers and body of a UTF-8 text part, 7bit when it can be.

    Quoted-printable keeps every line under 76 characters whatever the
    author wrote, and stays readable in the raw message. The body has
    ``\\n`` line ends and ends with one.
    """
    content = content.replace("\r\n", "\n").replace("\r", "\n")
    if not content.endswith("\n"):
        content += "\n"
    plain = content.isascii() and "\x00" not in content
    if plain and max(map(len, content.split("\n"))) <= _PLAIN_LINE:
        body, encoding = content, "7bit"
    else:
        encoded = binascii.b2a_qp(content.encode("utf-8"), istext=True)
        body, encoding = encoded.decode("ascii"), "quoted-printable"
    return _part_headers(subtype, encoding), body


@lru_cache(maxsize=8)
def _part_headers(subtype: str, encoding: str) -> tuple[FoldedHeader, ...]:
    return (
        header("Content-Type", f'text/{subtype}; charset="utf-8"'),
        header("Content-Transfer-Encoding", encoding),
    )


class FoldedHeader(str):
    """A header the policy parsed and folded once, written as folded.

    The email package re-parses and re-folds every header of every message;
    for a campaign that repeats the same From, Subject and Content-Type
    thousands of times, doing it once per distinct value is most of the cost
    of building a message. The email package writes a header object with a
    ``name`` and a ``fold`` method as that method returns it.
    """

    name: str
    folded: str

    def fold(self, *, policy: policy.Policy) -> str:
        if _same_folding(policy):
            return self.folded
        return POLICY.header_factory(self.name, str(self)).fold(policy=policy)


def _same_folding(other: policy.Policy) -> bool:
    """True when ``other`` folds like ``POLICY`` (the generator clones it)."""
    return other is POLICY or all(
        getattr(other, name, None) == getattr(POLICY, name)
        for name in ("linesep", "max_line_length", "utf8", "cte_type")
    )


def _fold(name: str, value: str) -> FoldedHeader:
    parsed = POLICY.header_factory(name, value)
    folded = FoldedHeader(str(parsed))
    folded.name = name
    folded.folded = parsed.fold(policy=POLICY)
    return folded


_fold_cached = lru_cache(maxsize=4096)(_fold)


class _UrlList(FoldedHeader):
    """A header listing URLs in angle brackets, folded only between the URLs.

    The generic folding would turn a URL longer than a line into an encoded
    word, which mail clients do not read as a URL.
    """

    entries: list[str]

    def __new__(cls, name: str, urls: list[str]) -> _UrlList:
        for url in urls:
            if one_line(url) != url or not url.isascii() or len(url) > 900:
                raise SendError(f"{name}: {url!r} cannot be written in a header")
        entries = [f"<{url}>" for url in urls]
        value = str.__new__(cls, ", ".join(entries))
        value.name = name
        value.entries = entries
        value.folded = value.fold(policy=POLICY)
        return value

    def fold(self, *, policy: policy.Policy) -> str:
        separator = f",{policy.linesep} "
        return f"{self.name}: {separator.join(self.entries)}{policy.linesep}"


def verbatim_header(name: str, value: str) -> FoldedHeader:
    """A header written exactly as given: for ASCII tokens built here.

    Message-IDs need no parsing to be written; parsing one costs as much as
    the rest of the headers together.
    """
    if not value.isascii() or one_line(value) != value or len(value) > 900:
        raise SendError(f"header {name}: {value!r} cannot be written as is")
    folded = FoldedHeader(value)
    folded.name = name
    folded.folded = f"{name}: {value}{POLICY.linesep}"
    return folded


def header(name: str, value: str, *, cache: bool = True) -> FoldedHeader:
    """The header ``name: value`` parsed and folded by the SMTP policy.

    ``value`` must be a single line (see ``one_line``); ``cache`` is off for
    values unique to one message, which would only fill the cache.
    """
    if _LINE_BREAKS.search(value):
        raise SendError(f"header {name}: a value cannot contain a line break")
    if name in _PLAIN_TEXT_HEADERS:
        if _plain_enough(name, value):
            return verbatim_header(name, value)
        # The policy, folding a long or non-ASCII text, can put a space
        # between two encoded words, where readers drop it; encoded whole,
        # the text is read back exactly as written.
        encoded = _encoded_cached if cache else _encoded_text
        return encoded(name, value, value)
    if "=?" in value:
        return _encoded_text(name, value, value)
    return _fold_cached(name, value) if cache else _fold(name, value)


def _encoded_text(name: str, text: str, value: str, after: str = "") -> FoldedHeader:
    """A header whose text is written whole as RFC 2047 encoded words.

    For text the policy would misread or misfold: ``=?utf-8?b?...?=`` in a
    subject or a name, which it would decode (a line break there would start
    a header of its own); a long or non-ASCII subject, where it can lose a
    space; a display name that does not fit on one line, whose quotes it can
    drop. Encoded whole, the text reaches the reader as it was written, and
    a name stays one name. ``value`` is the header's value, ``text`` the
    part of it encoded and ``after`` what follows (an address in angle
    brackets).
    """
    encoded = Header(text, "utf-8", header_name=name).encode(linesep=POLICY.linesep)
    folded = FoldedHeader(value)
    folded.name = name
    folded.folded = f"{name}: {encoded}{after}{POLICY.linesep}"
    return folded


_encoded_cached = lru_cache(maxsize=1024)(_encoded_text)


_PLAIN_TEXT_HEADERS = {"Subject"}
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9 ]*<[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@-]+>")


def _plain_enough(name: str, value: str) -> bool:
    """True when the policy would write this text header unchanged.

    Printable ASCII that fits on one line, with nothing that reads as an
    encoded word, needs neither encoding nor folding.
    """
    return (
        value.isascii()
        and value.isprintable()
        and "=?" not in value
        and value == value.strip()
        and "  " not in value
        and len(name) + 2 + len(value) <= POLICY.max_line_length
    )


def address_header(name: str, address: Address, *, cache: bool = False) -> FoldedHeader:
    """An address header whose display name always reads back as one name.

    ``Person Name <someone@example.com>`` needs no quoting nor encoding and
    is written as it is. An ASCII name that fits on the line with its
    address is quoted by the policy (commas, quotes). Any other name (accents,
    ``=?``, or too long for one line) is encoded whole (see
    ``_encoded_text``): folded by the policy, a long quoted name can lose its
    quotes and read as several addresses, one of them the name's own.
    """
    value = str(address)
    display_name = address.display_name
    if not display_name:
        # An address alone is written as checked: the policy would decode an
        # encoded-word look-alike in its mailbox part into other addresses.
        return verbatim_header(name, address.addr_spec)
    fits = len(name) + 2 + len(value) <= POLICY.max_line_length
    if fits and value.isascii() and "=?" not in display_name:
        if _PLAIN_ADDRESS.fullmatch(value):
            return verbatim_header(name, value)
        return _fold_cached(name, value) if cache else _fold(name, value)
    encoded = _encoded_cached if cache else _encoded_text
    return encoded(name, display_name, value, f" <{address.addr_spec}>")


# --- Per recipient ----------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """One addressee: their delivery (None for a test) and contact values."""

    email: str
    name: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    delivery_id: int | None = None

    def context(self) -> dict[str, Any]:
        """What ``{contact.<key>}`` can name in the templates."""
        return {**self.attributes, "email": self.email, "name": self.name}


class LinkIds:
    """The Link row id of each URL of one emailing, created once and cached.

    Shared by the connections of a worker; a new URL costs one short
    transaction of its own, retried if SQLite is busy with another writer.
    """

    def __init__(self, engine: Engine, emailing_id: int) -> None:
        self.engine = engine
        self.emailing_id = emailing_id
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, url: str) -> int:
        with self._lock:
            known = self._ids.get(url)
        if known is not None:
            return known
        for attempt in range(5):
            try:
                with Session(self.engine) as session:
                    link_id = links.link_id_for(session, self.emailing_id, url)
                    session.commit()
                break
            except OperationalError:
                if attempt == 4:
                    raise
        with self._lock:
            self._ids[url] = link_id
        return link_id


_MARKER = re.compile("\x00([0-9]+)\x00")
"""Where a field gets a value per recipient; NUL never occurs in a field."""
_CONTACT = "contact"
_UNSUBSCRIBE = "unsubscribe"
_CLICK = "click"
_OPEN = "open"


class _Field:
    """A field of an emailing with what changes per recipient found once.

    ``templating.render_for_recipient`` runs once, with a marker in place of
    each value; the text between markers is kept, and each message only
    fills the slots: contact values, the unsubscribe URL and, in a tracked
    HTML body, the click and open URLs.
    """

    def __init__(self, template: str, *, html: bool) -> None:
        self.html = html
        self._slots: dict[tuple[str, Any], int] = {}
        unsubscribe = self._slot(_UNSUBSCRIBE)
        self.marked = templating.render_for_recipient(
            template,
            contact=_MarkedContact(self),
            unsubscribe_url=unsubscribe,
            html=html,
        )
        self.pieces = _pieces(self.marked)

    def _slot(self, kind: str, argument: Any = None) -> str:
        index = self._slots.setdefault((kind, argument), len(self._slots))
        return f"\x00{index}\x00"

    def track(self, link_ids: Callable[[str], int]) -> _Field | None:
        """This HTML body with its links rewritten once, or None if it cannot be.

        A recipient variable inside a tag could change the links (the one
        exception: ``href="{unsubscribe_url}"``, which tracking leaves as is);
        such a body is tracked per message instead.
        """
        holes = [marker.span() for marker in _MARKER.finditer(self.marked)]
        unsubscribe = self._slot(_UNSUBSCRIBE)
        own_hrefs = [
            marker.span() for marker in re.finditer(re.escape(unsubscribe), self.marked)
        ]
        if not links.links_stay_put(self.marked, holes, whole_hrefs=own_hrefs):
            return None
        own = f"{get_settings().public_url}/t/"
        tracked = copy.copy(self)
        tracked._slots = dict(self._slots)

        def url_for(url: str) -> str:
            # Our own unsubscribe link stays as it is: it is not a click.
            if url.startswith(own):
                return url
            return tracked._slot(_CLICK, link_ids(url))

        html = links.rewrite_links(self.marked, url_for)
        tracked.marked = links.add_pixel(html, tracked._slot(_OPEN))
        tracked.pieces = _pieces(tracked.marked)
        return tracked

    def fill(
        self, contact: dict[str, Any], unsubscribe_url: str, delivery_id: int
    ) -> str:
        """The field for one recipient."""
        if len(self.pieces) == 1 and isinstance(self.pieces[0], str):
            return self.pieces[0]
        escape = html_lib.escape if self.html else _as_is
        values: list[str] = []
        for kind, argument in self._slots:
            if kind == _CONTACT:
                values.append(escape(format_value(None, contact.get(argument))))
            elif kind == _UNSUBSCRIBE:
                values.append(escape(unsubscribe_url))
            elif kind == _CLICK:
                token = tokens.click_token(delivery_id, argument)
                values.append(_escaped_prefix(tokens.CLICK) + token)
            else:
                token = tokens.open_token(delivery_id)
                values.append(_escaped_prefix(tokens.OPEN) + token)
        return "".join(
            [
                piece if isinstance(piece, str) else values[piece]
                for piece in self.pieces
            ]
        )


class _MarkedContact(dict[str, Any]):
    """A contact whose every value is a marker naming the variable asked for."""

    def __init__(self, field: _Field) -> None:
        super().__init__()
        self._field = field

    def get(self, key: str, default: Any = None) -> str:  # type: ignore[override]
        return self._field._slot(_CONTACT, key)


def _pieces(marked: str) -> list[str | int]:
    """Text and slot numbers, in order; the slots are at odd positions."""
    parts = _MARKER.split(marked)
    return [
        int(part) if position % 2 else part
        for position, part in enumerate(parts)
        if position % 2 or part
    ]


def _as_is(text: str) -> str:
    return text


@lru_cache(maxsize=8)
def _escaped_prefix_for(public_url: str, kind: str) -> str:
    # Tokens hold only letters, digits, "-", "_" and ".": nothing to escape.
    return html_lib.escape(tokens.url_prefix(kind), quote=True)


def _escaped_prefix(kind: str) -> str:
    return _escaped_prefix_for(get_settings().public_url, kind)


@dataclass(frozen=True)
class _Body:
    """A draft's fields made ready for one emailing's messages."""

    subject: _Field
    text: _Field | None
    """None when the text part is derived from each message's HTML."""
    html: _Field
    tracked: _Field | None
    """The HTML with its links rewritten once; None when not tracked so."""


def _address_of(emailing: Emailing, field: str, name: str = "") -> Address:
    """The emailing's sender or reply-to address; an error names the field."""
    email = emailing.sender_email if field == "sender email" else emailing.reply_to
    try:
        return make_address(name, email or "")
    except SendError as exc:
        raise SendError(f"emailing {emailing.id}: {field}: {exc}") from None


@dataclass(frozen=True)
class Draft:
    """What an emailing says, read once and rendered for each recipient."""

    emailing_id: int
    subject: str
    text: str
    html: str
    sender: Address
    reply_to: Address | None
    tracking: bool
    domain: str
    boundary: str = field(default_factory=lambda: f"=_{secrets.token_hex(12)}")
    tag: str = field(default_factory=lambda: secrets.token_hex(6))
    """Random part of this draft's Message-IDs, unique across installations."""
    _bodies: dict[Any, _Body | None] = field(
        default_factory=dict, compare=False, repr=False
    )
    _lock: threading.Lock = field(
        default_factory=threading.Lock, compare=False, repr=False
    )

    def message_id_parts(self) -> tuple[str, str]:
        """What comes before and after the delivery id in a Message-ID.

        Message-IDs tell, on a reply or a bounce, which delivery it was; the
        sender stores them in SQL from these two parts.
        """
        return f"<e{self.emailing_id}.d", f".{self.tag}@{self.domain}>"

    def message_id(self, delivery_id: int | None) -> str:
        if delivery_id is None:
            return f"<e{self.emailing_id}.test.{secrets.token_hex(6)}@{self.domain}>"
        before, after = self.message_id_parts()
        return f"{before}{delivery_id}{after}"

    @classmethod
    def from_emailing(cls, emailing: Emailing) -> Draft:
        if emailing.id is None:
            raise SendError("the emailing has not been saved")
        if not emailing.sender_email:
            raise SendError(f"emailing {emailing.id}: it has no sender address")
        sender = _address_of(emailing, "sender email", emailing.sender_name)
        reply_to = _address_of(emailing, "reply-to") if emailing.reply_to else None
        html = emailing.html.strip() or html_from_text(emailing.message)
        return cls(
            emailing_id=emailing.id,
            subject=emailing.subject,
            text=emailing.message,
            html=html,
            sender=sender,
            reply_to=reply_to,
            tracking=emailing.tracking,
            domain=sender.domain,
        )

    def compose(
        self,
        recipient: Recipient,
        *,
        link_ids: Callable[[str], int] | None,
        now: datetime,
        test: bool = False,
    ) -> Composed:
        """The message for one recipient, ready to be written out.

        A test message carries test tokens: its links and pixel work but are
        never counted, and its unsubscribe link unsubscribes no one.
        """
        delivery_id = recipient.delivery_id
        if not test and delivery_id is None:
            raise SendError("a message to a recipient needs its delivery")
        if test or delivery_id is None or (body := self._body(link_ids)) is None:
            return self._render_each(recipient, link_ids=link_ids, now=now, test=test)

        # Tracking and unsubscribe addresses of this recipient.
        token = tokens.unsubscribe_token(delivery_id)
        unsubscribe_url = tokens.url_prefix(tokens.UNSUBSCRIBE) + token
        mailto = tokens.unsubscribe_mailto(delivery_id, token=token)

        # Recipient variables, and the tracking prepared once for the emailing.
        contact = recipient.context()
        values = (contact, unsubscribe_url, delivery_id)
        subject = body.subject.fill(*values)
        html = None
        if body.text is not None:
            text = body.text.fill(*values)
        else:
            html = body.html.fill(*values)
            text = text_from_html(html)
        if body.tracked is not None:
            html = body.tracked.fill(*values)
        else:
            html = html or body.html.fill(*values)
            if self.tracking and link_ids is not None:
                html = self._track(html, delivery_id, link_ids, test=False)

        return compose(
            subject=subject,
            text=text,
            html=html,
            sender=self.sender,
            recipient=make_address(recipient.name, recipient.email),
            reply_to=self.reply_to,
            message_id=self.message_id(delivery_id),
            date=now,
            unsubscribe=[unsubscribe_url, mailto],
            boundary=self.boundary,
        )

    def _body(self, link_ids: Callable[[str], int] | None) -> _Body | None:
        """The fields ready for this emailing's messages, prepared on first use.

        None when a field holds a NUL character (which marks the slots): its
        messages are then rendered one by one.
        """
        tracking = self.tracking and link_ids is not None
        key = link_ids if tracking else None
        with self._lock:
            if key in self._bodies:
                return self._bodies[key]
            body = None
            if "\x00" not in self.subject + self.text + self.html:
                html = _Field(self.html, html=True)
                body = _Body(
                    subject=_Field(self.subject, html=False),
                    text=_Field(self.text, html=False) if self.text.strip() else None,
                    html=html,
                    tracked=html.track(link_ids) if tracking else None,  # type: ignore[arg-type]
                )
            self._bodies[key] = body
            return body

    def _render_each(
        self,
        recipient: Recipient,
        *,
        link_ids: Callable[[str], int] | None,
        now: datetime,
        test: bool = False,
    ) -> Composed:
        """The message for one recipient, every field rendered for it alone."""
        delivery_id = recipient.delivery_id

        # Tracking and unsubscribe addresses of this recipient.
        if test:
            unsubscribe_url = tokens.unsubscribe_url_for_test(self.emailing_id)
            unsubscribe = [unsubscribe_url]
        else:
            token = tokens.unsubscribe_token(delivery_id)  # type: ignore[arg-type]
            unsubscribe_url = tokens.url_prefix(tokens.UNSUBSCRIBE) + token
            mailto = tokens.unsubscribe_mailto(delivery_id, token=token)  # type: ignore[arg-type]
            unsubscribe = [unsubscribe_url, mailto]

        # Recipient variables, then the tracking of the finished HTML.
        contact = recipient.context()
        subject = templating.render_for_recipient(
            self.subject, contact=contact, unsubscribe_url=unsubscribe_url, html=False
        )
        html = templating.render_for_recipient(
            self.html, contact=contact, unsubscribe_url=unsubscribe_url, html=True
        )
        if self.text.strip():
            text = templating.render_for_recipient(
                self.text,
                contact=contact,
                unsubscribe_url=unsubscribe_url,
                html=False,
            )
        else:
            text = text_from_html(html)
        if self.tracking and link_ids is not None:
            html = self._track(html, delivery_id, link_ids, test=test)

        headers = {TEST_HEADER: "yes"} if test else None
        return compose(
            subject=(TEST_PREFIX + subject) if test else subject,
            text=text,
            html=html,
            sender=self.sender,
            recipient=make_address(recipient.name, recipient.email),
            reply_to=self.reply_to,
            message_id=self.message_id(delivery_id),
            date=now,
            unsubscribe=unsubscribe,
            headers=headers,
            boundary=self.boundary,
        )

    def _track(
        self,
        html: str,
        delivery_id: int | None,
        link_ids: Callable[[str], int],
        *,
        test: bool,
    ) -> str:
        own = f"{get_settings().public_url}/t/"

        def url_for(url: str) -> str:
            # Our own unsubscribe link stays as it is: it is not a click.
            if url.startswith(own):
                return url
            link_id = link_ids(url)
            if test:
                return tokens.click_url_for_test(self.emailing_id, link_id)
            return tokens.click_url(delivery_id, link_id)  # type: ignore[arg-type]

        html = links.rewrite_links(html, url_for)
        if test:
            return links.add_pixel(html, tokens.open_url_for_test(self.emailing_id))
        return links.add_pixel(html, tokens.open_url(delivery_id))  # type: ignore[arg-type]
