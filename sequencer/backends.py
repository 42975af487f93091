"""Where messages go: an SMTP server, or the outbox folder when none is set.

A backend opens *connections*; the sender keeps one per parallel slot and
reuses it for message after message. Sending one message ends in one of four
ways, which decide what happens to its delivery:

- ``Accepted``: the server took it (or the outbox file is written);
- ``Refused``: the server answered for this recipient, 5xx (permanent, the
  delivery bounces) or 4xx (temporary, it is retried later); a timeout or a
  lost connection before the whole message was handed over counts as a 4xx;
- ``Uncertain``: the whole message was handed over, then the answer never
  came (a timeout, a dropped connection). The server may have accepted it, so
  it is never sent again: resending is how one recipient gets two;
- ``ServerUnavailable`` raised: the server could not be reached at all. No
  recipient is at fault, so no attempt is counted and the emailing waits.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from sequencer.config import Settings, get_settings
from sequencer.exceptions import ValidationError

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_IDLE = 10.0
"""Seconds after which a reused SMTP session is checked before sending."""


@dataclass(frozen=True)
class Accepted:
    """The server accepted the message for this recipient."""

    reply: str


@dataclass(frozen=True)
class Refused:
    """The server refused the message for this recipient."""

    code: int
    reply: str
    address: bool = False
    """The answer to RCPT TO: about the address. Otherwise it is about the
    sender or the message (MAIL FROM, DATA), and says nothing of the address."""

    @property
    def permanent(self) -> bool:
        """A 5xx: retrying cannot help."""
        return 500 <= self.code < 600

    @property
    def bounce(self) -> bool:
        """A 5xx to RCPT TO: the address is bad and the contact bounces."""
        return self.permanent and self.address


@dataclass(frozen=True)
class Uncertain:
    """The message was handed over but no answer came: it may have gone out."""

    reply: str


Outcome = Accepted | Refused | Uncertain


class ServerUnavailable(Exception):
    """The server cannot be reached or dropped the connection before answering."""


class Connection(Protocol):
    """One open channel to a backend, used by one thread at a time."""

    def send(self, message: bytes, sender: str, recipient: str) -> Outcome: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Opens connections and says, in words, where messages go."""

    accepted_reply: str
    """What a delivery keeps as its reply when the message was accepted."""

    def connect(self) -> Connection: ...

    def describe(self) -> str: ...


# --- SMTP -----------------------------------------------------------------------


@dataclass(frozen=True)
class SMTPConfig:
    """An SMTP server as given by ``SEQUENCER_SMTP_URL``."""

    host: str
    port: int
    ssl: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 30.0) -> SMTPConfig:
        """Read ``smtp://user:pass@host:port?starttls=1`` or ``smtps://...``."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("smtp", "smtps"):
            raise ValidationError(
                "SEQUENCER_SMTP_URL", None, f"scheme must be smtp or smtps, not {url!r}"
            )
        if not parts.hostname:
            raise ValidationError("SEQUENCER_SMTP_URL", None, "the host is missing")
        query = {
            key.lower(): values[-1] for key, values in parse_qs(parts.query).items()
        }
        try:
            port = parts.port or (465 if scheme == "smtps" else 25)
        except ValueError as exc:
            raise ValidationError("SEQUENCER_SMTP_URL", None, str(exc)) from exc
        return cls(
            host=parts.hostname,
            port=port,
            ssl=scheme == "smtps",
            starttls=query.get("starttls", "").lower() in _TRUE,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            timeout=float(query.get("timeout", timeout)),
        )

    def describe(self) -> str:
        security = "TLS" if self.ssl else "STARTTLS" if self.starttls else "plain"
        user = f"{self.username}@" if self.username else ""
        return f"SMTP server {user}{self.host}:{self.port} ({security})"


class _SMTP(smtplib.SMTP):
    """``smtplib.SMTP`` that knows when a message has left, and is quick.

    ``handed_over`` turns true once the message data, with its final dot,
    is written to the server during ``DATA``: from then on a silence may
    hide an accepted message. The sender writes ``MAIL FROM`` and ``RCPT
    TO`` from addresses that ``message.make_address`` checked; smtplib would
    parse each again with ``email.utils.parseaddr``, a good part of its work
    for a message.
    """

    handed_over = False
    _in_data = False

    def data(self, msg: bytes | str) -> tuple[int, bytes]:
        self._in_data = True
        try:
            return super().data(msg)
        finally:
            self._in_data = False

    def send(self, s: bytes | str) -> None:
        super().send(s)
        # smtplib writes commands as text and the message data as bytes.
        if self._in_data and isinstance(s, bytes):
            self.handed_over = True

    def mail(self, sender: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        utf8 = any(option.lower() == "smtputf8" for option in options)
        if utf8 or not _plain_address(sender):
            return super().mail(sender, options)
        self.putcmd("mail", f"FROM:<{sender}>{self._options(options)}")
        return self.getreply()

    def rcpt(self, recip: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        if not _plain_address(recip):
            return super().rcpt(recip, options)
        self.putcmd("rcpt", f"TO:<{recip}>{self._options(options)}")
        return self.getreply()

    def _options(self, options: Sequence[str]) -> str:
        return " " + " ".join(options) if options and self.does_esmtp else ""


class _SMTPSSL(_SMTP, smtplib.SMTP_SSL):
    """``smtplib.SMTP_SSL`` writing plain envelope addresses as they are."""


_ADDR_SPEC = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")


def _plain_address(address: str) -> bool:
    """True for ``local@domain`` that smtplib's parsing would leave unchanged."""
    return _ADDR_SPEC.fullmatch(address) is not None


class SMTPConnection:
    """A reused SMTP session; it reconnects lazily after the server drops it."""

    def __init__(self, config: SMTPConfig) -> None:
        self.config = config
        self._smtp: _SMTP | None = None
        self._last_used = time.monotonic()

    def _open(self) -> _SMTP:
        config = self.config
        try:
            if config.ssl:
                smtp: _SMTP = _SMTPSSL(
                    config.host,
                    config.port,
                    timeout=config.timeout,
                    context=ssl.create_default_context(),
                )
            else:
                smtp = _SMTP(config.host, config.port, timeout=config.timeout)
            # A refused greeting (421 too many connections) raises here: no
            # message is tried on a session the server did not open.
            smtp.ehlo_or_helo_if_needed()
            if config.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo_or_helo_if_needed()
            if config.username:
                smtp.login(config.username, config.password or "")
        except smtplib.SMTPAuthenticationError as exc:
            raise ServerUnavailable(f"login refused: {_reply(exc)}") from exc
        except smtplib.SMTPResponseException as exc:
            raise ServerUnavailable(
                f"{config.host}:{config.port} turned the session away: {_reply(exc)}"
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise ServerUnavailable(
                f"cannot reach {config.host}:{config.port}: {exc}"
            ) from exc
        logger.debug("connected to %s:%s", config.host, config.port)
        return smtp

    def send(self, message: bytes, sender: str, recipient: str) -> Outcome:
        smtp = self._ready()
        smtp.handed_over = False
        try:
            smtp.sendmail(sender, [recipient], message)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[recipient]
            # A 421 ends the session wherever it comes (smtplib closed it).
            if code == 421:
                self._drop()
            return Refused(code, _decode(code, text), address=True)
        except smtplib.SMTPResponseException as exc:
            # Sender or data refused: the answer is about this message. A 421
            # also ends the session (smtplib closed it), so open a new one next.
            if exc.smtp_code == 421:
                self._drop()
            return Refused(exc.smtp_code, _reply(exc))
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            # A new session next time. Before the whole message was written
            # the server cannot have taken it: a temporary failure (it counts
            # an attempt). After, it may have: never send it again.
            self._drop()
            # smtplib reports a reply that timed out as a lost connection.
            silent = TimeoutError in (type(exc), type(exc.__context__))
            if silent:
                what = f"no answer in {self.config.timeout:g}s"
            else:
                what = f"connection lost: {exc}"
            if smtp.handed_over:
                return Uncertain(f"the message was handed over, then {what}")
            return Refused(451, what)
        finally:
            self._last_used = time.monotonic()
        return Accepted("250 accepted")

    def _ready(self) -> _SMTP:
        """The open session, checked with a NOOP when it sat idle a while.

        Servers close idle sessions; finding out before MAIL FROM means a
        message is never half-started on a dead session.
        """
        if self._smtp is not None and time.monotonic() - self._last_used > _IDLE:
            try:
                alive = self._smtp.noop()[0] == 250
            except (smtplib.SMTPException, OSError):
                alive = False
            if not alive:
                self._drop()
        if self._smtp is None:
            self._smtp = self._open()
        return self._smtp

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            try:
                smtp.close()
            except OSError:
                pass

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()


def _decode(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {text}"


def _reply(exc: smtplib.SMTPResponseException) -> str:
    return _decode(exc.smtp_code, exc.smtp_error)


class SMTPBackend:
    """Sends through the SMTP server of ``SEQUENCER_SMTP_URL``."""

    def __init__(self, config: SMTPConfig) -> None:
        self.config = config
        self.accepted_reply = f"250 accepted by {config.host}:{config.port}"

    def connect(self) -> SMTPConnection:
        return SMTPConnection(self.config)

    def describe(self) -> str:
        return self.config.describe()


# --- Outbox ---------------------------------------------------------------------


class OutboxConnection:
    """Writes each message as an ``.eml`` file; a crash never leaves half a file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def send(self, message: bytes, sender: str, recipient: str) -> Outcome:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.eml"
            partial = self.folder / f".{name}.part"
            partial.write_bytes(message)
            os.replace(partial, self.folder / name)
        except OSError as exc:
            raise ServerUnavailable(f"cannot write to {self.folder}: {exc}") from exc
        return Accepted(f"written to {self.folder / name}")

    def close(self) -> None:
        """Nothing to release: each message is a file of its own."""


class OutboxBackend:
    """The embedded default: messages are written to ``data/outbox/``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.accepted_reply = f"written to {folder}"

    def connect(self) -> OutboxConnection:
        return OutboxConnection(self.folder)

    def describe(self) -> str:
        return (
            f"Outbox: no SEQUENCER_SMTP_URL is set, so messages are written as "
            f".eml files under {self.folder} instead of being sent"
        )


def get_backend(settings: Settings | None = None) -> Backend:
    """The backend the configuration asks for."""
    settings = settings or get_settings()
    if settings.smtp_url:
        config = SMTPConfig.from_url(settings.smtp_url, timeout=settings.smtp_timeout)
        return SMTPBackend(config)
    return OutboxBackend(settings.outbox_dir)


def describe_backend(settings: Settings | None = None) -> str:
    """Where messages go, in words, for the dashboard (no password)."""
    return get_backend(settings).describe()


# --- Rate -----------------------------------------------------------------------


class RateLimiter:
    """At most ``rate`` messages per second over every connection of a worker.

    Slots are handed out evenly spaced, so parallel connections never burst
    past the limit a provider set.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)
