"""Signed tokens in tracking and unsubscribe links.

A token names what a request is about (a delivery, a link) and is signed with
the project's secret key, so a recipient cannot forge another recipient's
unsubscribe or point a click at a URL of their own. Tokens never expire: an
email opened a year later still shows its images and its links still work.

Test sends carry tokens of their own ("test tokens"): valid, so the links in a
test message work, but they name the emailing rather than a delivery and the
tracking routes record nothing for them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, urlsplit

from itsdangerous import BadSignature, Signer
from itsdangerous.encoding import base64_encode, want_bytes
from sqlalchemy import Connection, Engine
from sqlmodel import Session

from sequencer.config import get_settings
from sequencer.db import get_engine, insert_ignoring_conflicts
from sequencer.models import Setting

logger = logging.getLogger(__name__)

SECRET_KEY_SETTING = "secret_key"
"""Key of the ``setting`` row that holds the generated secret key."""

OPEN = "open"
CLICK = "click"
UNSUBSCRIBE = "unsubscribe"
KINDS = (OPEN, CLICK, UNSUBSCRIBE)

_PATHS = {OPEN: "o", CLICK: "c", UNSUBSCRIBE: "u"}
"""The path segment of each kind under ``/t/``: short, since every link has one."""

_key_lock = threading.Lock()
_cached_key: tuple[str, str] | None = None
"""``(database url, key)`` of the key read from the database."""


@dataclass(frozen=True)
class TokenPayload:
    """What a valid token says.

    A real token names a ``delivery_id``; a test token names an ``emailing_id``
    and has ``test`` set. A click token also names its ``link_id``.
    """

    kind: str
    delivery_id: int | None = None
    emailing_id: int | None = None
    link_id: int | None = None
    test: bool = False


# --- The secret key -----------------------------------------------------------


def secret_key(session: Session | None = None) -> str:
    """The key that signs tokens: ``SEQUENCER_SECRET_KEY``, else the stored one.

    When the variable is unset, a random key is generated on first use and
    stored in the ``setting`` table, so every process that shares the database
    (dashboard, workers) signs and checks with the same key, and links in sent
    emails keep working across restarts. Two processes racing to create it
    both end up with the one that reached the database first.
    """
    configured = get_settings().secret_key
    if configured:
        return configured
    if session is not None:
        return _stored_key(session.get_bind())

    global _cached_key
    url = get_settings().database_url
    with _key_lock:
        if _cached_key is None or _cached_key[0] != url:
            _cached_key = (url, _stored_key(get_engine()))
        return _cached_key[1]


def forget_secret_key() -> None:
    """Drop the cached stored key (tests switch databases)."""
    global _cached_key
    with _key_lock:
        _cached_key = None
    _signer.cache_clear()


def _stored_key(bind: Engine | Connection) -> str:
    """Read the stored key, creating it if no process has yet.

    Runs in a transaction of its own, so the key is kept even if the caller's
    transaction rolls back after tokens were signed with it.
    """
    engine = bind.engine
    candidate = secrets.token_urlsafe(32)
    with engine.begin() as connection:
        created = insert_ignoring_conflicts(
            connection,
            Setting,
            {"key": SECRET_KEY_SETTING, "value": candidate},
            conflict_columns=["key"],
        )
    with Session(engine) as session:
        setting = session.get(Setting, SECRET_KEY_SETTING)
    if setting is None:
        raise RuntimeError("the secret key could not be stored")
    if created:
        logger.info("generated the secret key that signs tracking links")
    return setting.value


# --- Signing ---------------------------------------------------------------

_PAYLOAD = re.compile(r"(t?)([1-9][0-9]{0,17})(?:-([1-9][0-9]{0,17}))?")
"""``<delivery>``, ``<delivery>-<link>``; ``t`` first for a test send's emailing."""


class _Signer(Signer):
    """The itsdangerous signer, deriving each key once rather than per token.

    Key derivation is a hash of the salt and the key; a message carries
    several tokens, so deriving it every time doubles the cost of signing.
    """

    def __init__(self, key: str, salt: str) -> None:
        # SHA-1 as itsdangerous' default, given as the hashlib constructor so
        # that hmac takes OpenSSL's fast path.
        super().__init__(key, salt=salt, digest_method=hashlib.sha1)
        self._derived: dict[bytes, bytes] = {}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        raw = self.secret_keys[-1] if secret_key is None else want_bytes(secret_key)
        derived = self._derived.get(raw)
        if derived is None:
            derived = self._derived[raw] = super().derive_key(raw)
        return derived

    def get_signature(self, value: str | bytes) -> bytes:
        # HMAC-SHA1 as the library computes it, in one call into OpenSSL;
        # checking a token still goes through the library's own code.
        digest = hmac.digest(self.derive_key(), want_bytes(value), "sha1")
        return base64_encode(digest)

    def sign_text(self, payload: str) -> str:
        """``sign(payload)`` as text, for the ASCII payloads of this module.

        A message carries four tokens, whose signing is a tenth of what
        rendering it costs; this skips the library's conversions to and from
        bytes around each. ``tests/test_tokens.py`` compares it with ``sign``.
        """
        signature = self.get_signature(payload.encode("ascii"))
        return f"{payload}{self.sep.decode('ascii')}{signature.decode('ascii')}"


@lru_cache(maxsize=16)
def _signer(key: str, kind: str) -> _Signer:
    """One signer per kind: the kind is the salt, so tokens cannot be swapped.

    The payload is a few digits rather than JSON: the open pixel checks a
    token on every request, and this keeps it to one HMAC.
    """
    return _Signer(key, salt=f"sequencer.{kind}")


def _sign(kind: str, *numbers: int, test: bool = False) -> str:
    payload = ("t" if test else "") + "-".join(str(number) for number in numbers)
    return _signer(secret_key(), kind).sign_text(payload)


def url_prefix(kind: str) -> str:
    """What comes before the token in the tracking URLs of ``kind``."""
    return f"{get_settings().public_url}/t/{_PATHS[kind]}/"


def _url(kind: str, token: str) -> str:
    return url_prefix(kind) + token


def read_token(kind: str, token: str) -> TokenPayload | None:
    """The payload of a token of the given kind, or None if it is not genuine.

    None covers every failure alike (bad signature, another kind's token,
    malformed payload), so the caller answers 404 and records nothing.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind!r}")
    try:
        payload = _signer(secret_key(), kind).unsign(token).decode("ascii")
    except (BadSignature, UnicodeError):
        return None
    return _parse(kind, payload)


def _parse(kind: str, payload: str) -> TokenPayload | None:
    """Check the shape of a signed payload; signed but odd payloads are refused."""
    match = _PAYLOAD.fullmatch(payload)
    if match is None or (match[3] is not None) != (kind == CLICK):
        return None
    number = int(match[2])
    link_id = int(match[3]) if match[3] else None
    if match[1]:
        return TokenPayload(kind, emailing_id=number, link_id=link_id, test=True)
    return TokenPayload(kind, delivery_id=number, link_id=link_id)


# --- URL builders ------------------------------------------------------------


def open_token(delivery_id: int) -> str:
    """The token of the open pixel of one delivery."""
    return _sign(OPEN, delivery_id)


def open_url(delivery_id: int) -> str:
    """The URL of the 1x1 image that records an open."""
    return _url(OPEN, open_token(delivery_id))


def click_token(delivery_id: int, link_id: int) -> str:
    """The token of one link of one delivery."""
    return _sign(CLICK, delivery_id, link_id)


def click_url(delivery_id: int, link_id: int) -> str:
    """The URL that records a click and redirects to the link's stored URL."""
    return _url(CLICK, click_token(delivery_id, link_id))


def unsubscribe_token(delivery_id: int) -> str:
    """The token of the unsubscribe link and mailto of one delivery."""
    return _sign(UNSUBSCRIBE, delivery_id)


def unsubscribe_url(delivery_id: int) -> str:
    """The unsubscribe page (GET) and one-click endpoint (POST, RFC 8058)."""
    return _url(UNSUBSCRIBE, unsubscribe_token(delivery_id))


def unsubscribe_mailto(
    delivery_id: int, *, address: str | None = None, token: str | None = None
) -> str:
    """A ``mailto:`` for the List-Unsubscribe header.

    The token goes in the subject, so whoever reads the mailbox (by default
    ``unsubscribe@`` the public host) can match the request to the recipient.
    ``token`` is the delivery's ``unsubscribe_token``, when already signed.
    """
    if address is None:
        address = _unsubscribe_address(get_settings().public_url)
    token = token or unsubscribe_token(delivery_id)
    return f"mailto:{address}?subject={_SUBJECT}{quote(token, safe='.')}"


_SUBJECT = quote("unsubscribe ")


@lru_cache(maxsize=4)
def _unsubscribe_address(public_url: str) -> str:
    return f"unsubscribe@{urlsplit(public_url).hostname or 'localhost'}"


def open_url_for_test(emailing_id: int) -> str:
    """The open pixel of a test send: served, never recorded."""
    return _url(OPEN, _sign(OPEN, emailing_id, test=True))


def click_url_for_test(emailing_id: int, link_id: int) -> str:
    """A link of a test send: redirects like a real one, never recorded."""
    return _url(CLICK, _sign(CLICK, emailing_id, link_id, test=True))


def unsubscribe_url_for_test(emailing_id: int) -> str:
    """The unsubscribe link of a test send: shows the page, unsubscribes no one."""
    return _url(UNSUBSCRIBE, _sign(UNSUBSCRIBE, emailing_id, test=True))
