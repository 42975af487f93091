"""A real SMTP server on loopback for tests: aiosmtpd recording every message.

``SMTPSink`` accepts mail for any address and keeps the raw bytes of each
message per recipient, so tests can count what each address received and parse
it. Addresses put in ``bounce`` are refused with a 550 at RCPT time, those in
``defer`` with a 451, as a real server does for an unknown mailbox or a
greylisted sender. Those in ``stall_rcpt`` get no answer to RCPT for a while
(once each), and those in ``stall_data`` have their message stored and then
no answer to the end of DATA: a server that took it and went silent.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

BOUNCE_REPLY = "550 5.1.1 <{address}>: mailbox unavailable"
DEFER_REPLY = "451 4.7.1 <{address}>: greylisted, try again later"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, chosen by the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class RecordingHandler:
    """aiosmtpd handler: refuses chosen addresses and records the rest."""

    def __init__(self) -> None:
        self.bounce: set[str] = set()
        self.defer: set[str] = set()
        self.reply_once: dict[str, str] = {}
        """A reply given to the next RCPT of an address, in place of accepting."""
        self.stall_rcpt: set[str] = set()
        self.stall_data: set[str] = set()
        self.stall_seconds = 3.0
        self.messages: dict[str, list[bytes]] = defaultdict(list)
        self.arrivals: list[tuple[float, tuple[str, int]]] = []
        """When each message arrived (monotonic seconds) and on which session."""
        self.envelopes: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()
        self.refuse_message: str | None = None
        """A reply (e.g. ``554 ...``) given to every message at the end of DATA."""
        self.after_message: Callable[[int], None] | None = None
        """Called with the number of messages received so far, after each one."""

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        key = address.lower()
        if key in self.stall_rcpt:
            self.stall_rcpt.discard(key)
            await asyncio.sleep(self.stall_seconds)
        if key in self.reply_once:
            return self.reply_once.pop(key)
        if key in self.bounce:
            return BOUNCE_REPLY.format(address=address)
        if key in self.defer:
            return DEFER_REPLY.format(address=address)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        if self.refuse_message is not None:
            return self.refuse_message
        content = envelope.original_content or envelope.content
        data = content if isinstance(content, bytes) else content.encode()
        with self.lock:
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.arrivals.append((time.monotonic(), tuple(session.peer)))
            for address in envelope.rcpt_tos:
                self.messages[address.lower()].append(data)
            received = sum(len(value) for value in self.messages.values())
        if self.after_message is not None:
            self.after_message(received)
        if {address.lower() for address in envelope.rcpt_tos} & self.stall_data:
            await asyncio.sleep(self.stall_seconds)
        return "250 2.0.0 Message accepted for delivery"


class SMTPSink:
    """A started aiosmtpd server on 127.0.0.1 and what it received."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.handler = RecordingHandler()
        self.controller = Controller(
            self.handler,
            hostname=host,
            port=self.port,
            enable_SMTPUTF8=True,
            ready_timeout=10,
        )

    @property
    def url(self) -> str:
        """The value for ``SEQUENCER_SMTP_URL`` that reaches this server."""
        return f"smtp://{self.host}:{self.port}"

    @property
    def bounce(self) -> set[str]:
        """Lower-cased addresses answered 550 (permanent failure)."""
        return self.handler.bounce

    @property
    def defer(self) -> set[str]:
        """Lower-cased addresses answered 451 (temporary failure)."""
        return self.handler.defer

    def start(self) -> SMTPSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> SMTPSink:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def received(self, address: str) -> list[bytes]:
        """The raw messages ``address`` received, oldest first."""
        with self.handler.lock:
            return list(self.handler.messages.get(address.lower(), []))

    def parsed(self, address: str) -> list[EmailMessage]:
        """The messages ``address`` received, parsed with the modern policy."""
        parser = BytesParser(policy=policy.default)
        return [parser.parsebytes(raw) for raw in self.received(address)]  # type: ignore[misc]

    def counts(self) -> dict[str, int]:
        """How many messages each address received."""
        with self.handler.lock:
            return {key: len(value) for key, value in self.handler.messages.items()}

    def sessions(self) -> set[tuple[str, int]]:
        """The SMTP sessions (client address and port) messages came in on."""
        with self.handler.lock:
            return {peer for _at, peer in self.handler.arrivals}

    def arrival_times(self) -> list[float]:
        """When each message arrived, in monotonic seconds, oldest first."""
        with self.handler.lock:
            return sorted(at for at, _peer in self.handler.arrivals)

    def total(self) -> int:
        """How many messages were received, over every recipient."""
        return sum(self.counts().values())

    def clear(self) -> None:
        with self.handler.lock:
            self.handler.messages.clear()
            self.handler.envelopes.clear()
            self.handler.arrivals.clear()

    def wait_for(self, count: int, timeout: float = 30.0) -> int:
        """Wait until at least ``count`` messages arrived; return how many did.

        For tests where another process sends: a bound, not a timed assertion.
        """
        deadline = time.monotonic() + timeout
        while self.total() < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.total()
