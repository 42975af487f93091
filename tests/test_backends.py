"""Backends: the SMTP URL, TLS and login, an unreachable server, the outbox."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from smtp_server import RecordingHandler, free_port

from sequencer.backends import (
    Accepted,
    OutboxBackend,
    Refused,
    ServerUnavailable,
    SMTPBackend,
    SMTPConfig,
    describe_backend,
    get_backend,
)
from sequencer.config import Settings
from sequencer.exceptions import ValidationError

MESSAGE = b"Subject: hi\r\nFrom: a@example.com\r\nTo: b@example.com\r\n\r\nhello\r\n"


def test_smtp_url_with_starttls_user_and_password() -> None:
    config = SMTPConfig.from_url(
        "smtp://news%40shop:p%3Ass@mail.example.com:587?starttls=1"
    )

    assert config == SMTPConfig(
        host="mail.example.com",
        port=587,
        ssl=False,
        starttls=True,
        username="news@shop",
        password="p:ss",
    )
    assert config.describe() == "SMTP server news@shop@mail.example.com:587 (STARTTLS)"


def test_smtps_url_defaults_to_port_465() -> None:
    config = SMTPConfig.from_url("smtps://mail.example.com")

    assert (config.port, config.ssl, config.starttls) == (465, True, False)


def test_plain_smtp_url_defaults_to_port_25() -> None:
    assert SMTPConfig.from_url("smtp://localhost").port == 25


def test_other_scheme_is_refused() -> None:
    with pytest.raises(ValidationError, match="scheme must be smtp or smtps"):
        SMTPConfig.from_url("http://mail.example.com")


def test_url_without_host_is_refused() -> None:
    with pytest.raises(ValidationError, match="the host is missing"):
        SMTPConfig.from_url("smtp://")


def test_no_smtp_url_means_the_outbox(tmp_path: Path) -> None:
    settings = Settings(smtp_url=None, outbox_dir=tmp_path / "outbox")

    backend = get_backend(settings)

    assert isinstance(backend, OutboxBackend)
    assert "Outbox" in describe_backend(settings)
    assert str(tmp_path / "outbox") in describe_backend(settings)


def test_outbox_writes_the_message_bytes(tmp_path: Path) -> None:
    connection = OutboxBackend(tmp_path / "box").connect()

    outcome = connection.send(MESSAGE, "a@example.com", "b@example.com")

    (written,) = (tmp_path / "box").glob("*.eml")
    assert written.read_bytes() == MESSAGE
    assert isinstance(outcome, Accepted)


def test_unreachable_server_raises_server_unavailable() -> None:
    backend = SMTPBackend(SMTPConfig("127.0.0.1", free_port(), timeout=5))
    connection = backend.connect()

    with pytest.raises(ServerUnavailable, match="cannot reach 127.0.0.1"):
        connection.send(MESSAGE, "a@example.com", "b@example.com")


def test_connection_is_reused_for_several_messages(smtp_server) -> None:  # noqa: ANN001
    config = SMTPConfig.from_url(smtp_server.url)
    connection = SMTPBackend(config).connect()

    outcomes = [
        connection.send(MESSAGE, "a@example.com", f"p{n}@example.com") for n in range(3)
    ]
    connection.close()

    assert all(isinstance(outcome, Accepted) for outcome in outcomes)
    assert len(smtp_server.handler.envelopes) == 3
    assert smtp_server.total() == 3


def test_refusals_carry_code_and_reply(smtp_server) -> None:  # noqa: ANN001
    smtp_server.bounce.add("gone@example.com")
    smtp_server.defer.add("later@example.com")
    connection = SMTPBackend(SMTPConfig.from_url(smtp_server.url)).connect()

    gone = connection.send(MESSAGE, "a@example.com", "gone@example.com")
    later = connection.send(MESSAGE, "a@example.com", "later@example.com")
    fine = connection.send(MESSAGE, "a@example.com", "fine@example.com")

    assert isinstance(gone, Refused) and gone.permanent and gone.code == 550
    assert isinstance(later, Refused) and not later.permanent and later.code == 451
    assert "greylisted" in later.reply
    assert isinstance(fine, Accepted)


class ClosingHandler(RecordingHandler):
    """A server that turns the session away at its greeting (too many clients)."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: ANN001
        return ["421 4.7.0 Too many connections"]

    async def handle_HELO(self, server, session, envelope, hostname):  # noqa: ANN001
        return "421 4.7.0 Too many connections"


def test_session_turned_away_at_ehlo_is_unavailable_not_a_refusal() -> None:
    handler = ClosingHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        config = SMTPConfig("127.0.0.1", controller.port, timeout=5)
        connection = SMTPBackend(config).connect()
        with pytest.raises(ServerUnavailable, match="421 4.7.0 Too many"):
            connection.send(MESSAGE, "a@example.com", "b@example.com")
    finally:
        controller.stop()
    assert handler.envelopes == []


# --- TLS and login against a real server ------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, trusted by this test's clients."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return key, cert


def _authenticator(
    _server: object, _session: object, _envelope: object, mechanism: str, data: object
) -> AuthResult:
    ok = (
        isinstance(data, LoginPassword)
        and data.login == b"news"
        and data.password == b"s3cret"
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def tls_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    key, cert = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
def starttls_server(
    tls_context: ssl.SSLContext,
) -> Iterator[tuple[int, RecordingHandler]]:
    handler = RecordingHandler()
    port = free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        tls_context=tls_context,
        require_starttls=True,
        authenticator=_authenticator,
        auth_required=True,
        auth_exclude_mechanism=["LOGIN"],
    )
    controller.start()
    yield port, handler
    controller.stop()


def test_starttls_and_login_deliver(
    starttls_server: tuple[int, RecordingHandler],
) -> None:
    port, handler = starttls_server
    config = SMTPConfig.from_url(f"smtp://news:s3cret@localhost:{port}?starttls=1")
    connection = SMTPBackend(config).connect()

    outcome = connection.send(MESSAGE, "news@example.com", "b@example.com")
    connection.close()

    assert isinstance(outcome, Accepted)
    assert handler.messages["b@example.com"] == [MESSAGE]


def test_wrong_password_is_reported_as_unavailable(
    starttls_server: tuple[int, RecordingHandler],
) -> None:
    port, _handler = starttls_server
    config = SMTPConfig.from_url(
        f"smtp://news:wrong@localhost:{port}?starttls=1&timeout=5"
    )

    with pytest.raises(ServerUnavailable, match="login refused"):
        SMTPBackend(config).connect().send(MESSAGE, "a@example.com", "b@example.com")


def test_smtps_delivers_over_implicit_tls(tls_context: ssl.SSLContext) -> None:
    handler = RecordingHandler()
    port = free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, ssl_context=tls_context
    )
    controller.start()
    try:
        config = SMTPConfig.from_url(f"smtps://localhost:{port}")
        connection = SMTPBackend(config).connect()
        outcome = connection.send(MESSAGE, "a@example.com", "b@example.com")
        connection.close()
    finally:
        controller.stop()

    assert isinstance(outcome, Accepted)
    assert handler.messages["b@example.com"] == [MESSAGE]


def test_envelope_addresses_are_sent_as_given(smtp_server) -> None:  # noqa: ANN001
    connection = SMTPBackend(SMTPConfig.from_url(smtp_server.url)).connect()

    outcome = connection.send(MESSAGE, "news+a@shop.example.com", "o.k-1@example.com")
    odd = connection.send(MESSAGE, "news@shop.example.com", '"odd name"@example.com')
    connection.close()

    assert isinstance(outcome, Accepted) and isinstance(odd, Accepted)
    assert smtp_server.handler.envelopes == [
        ("news+a@shop.example.com", ["o.k-1@example.com"]),
        ("news@shop.example.com", ['"odd name"@example.com']),
    ]
