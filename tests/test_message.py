"""The message: encoding, headers, recipient variables, tracking, tests sends."""

from __future__ import annotations

from datetime import UTC, datetime
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import compat32

import pytest

from sequencer import tokens
from sequencer.exceptions import SendError
from sequencer.message import (
    TEST_HEADER,
    Draft,
    Recipient,
    compose,
    make_address,
    one_line,
)
from sequencer.models import Emailing

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from sequencer import config

    monkeypatch.setenv("SEQUENCER_SECRET_KEY", "message-tests")
    monkeypatch.setenv("SEQUENCER_PUBLIC_URL", "https://mail.shop.example.com")
    config.get_settings.cache_clear()
    tokens.forget_secret_key()


def _emailing(**values: object) -> Emailing:
    defaults: dict[str, object] = {
        "id": 12,
        "subject": "Bonjour {contact.name}",
        "message": "Bonjour {contact.name},\n\nNos nouveautés.\n",
        "html": (
            "<html><body><p>Bonjour {contact.name} ({contact.city})</p>"
            '<p><a href="https://shop.example.com/soldes?a=1&amp;b=2">Soldes</a> '
            '<a href="mailto:help@shop.example.com">Aide</a></p>'
            '<p><a href="{unsubscribe_url}">Se désabonner</a></p></body></html>'
        ),
        "sender_id": 1,
        "sender_name": "Boutique Été",
        "sender_email": "news@shop.example.com",
        "reply_to": "help@shop.example.com",
    }
    defaults.update(values)
    return Emailing(**defaults)


def _parse(message: EmailMessage) -> EmailMessage:
    parsed = BytesParser(policy=policy.default).parsebytes(message.as_bytes())
    assert isinstance(parsed, EmailMessage)
    return parsed


def _render(emailing: Emailing, recipient: Recipient, **kwargs: object) -> EmailMessage:
    links = iter(range(1, 100))
    ids: dict[str, int] = {}

    def link_ids(url: str) -> int:
        return ids.setdefault(url, next(links))

    return (
        Draft.from_emailing(emailing)
        .compose(recipient, link_ids=link_ids, now=NOW, **kwargs)
        .message()
    )


ZOE = Recipient(
    email="zoe@example.com",
    name="Zoé Łukasiewicz",
    attributes={"city": "Paris"},
    delivery_id=345,
)


def test_non_ascii_subject_and_names_round_trip() -> None:
    message = _parse(_render(_emailing(), ZOE))

    assert message["Subject"] == "Bonjour Zoé Łukasiewicz"
    assert message["From"].addresses[0].display_name == "Boutique Été"
    assert message["From"].addresses[0].addr_spec == "news@shop.example.com"
    assert message["To"].addresses[0].display_name == "Zoé Łukasiewicz"
    assert message["To"].addresses[0].addr_spec == "zoe@example.com"


def test_only_display_names_are_encoded_never_the_address() -> None:
    raw = _render(_emailing(), ZOE).as_bytes()
    headers = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")

    assert "=?utf-8?" in headers
    assert "<zoe@example.com>" in headers
    assert "<news@shop.example.com>" in headers


def test_message_is_multipart_alternative_in_utf8() -> None:
    message = _parse(_render(_emailing(), ZOE))

    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content_charset() == "utf-8"
    assert "Nos nouveautés" in text.get_content()
    assert "Bonjour Zoé Łukasiewicz (Paris)" in html.get_content()


def test_standard_headers_are_present() -> None:
    message = _parse(_render(_emailing(), ZOE))

    assert message["Message-ID"].startswith("<e12.d345.")
    assert message["Message-ID"].endswith("@shop.example.com>")
    assert message["Date"].datetime == NOW
    assert message["Reply-To"].addresses[0].addr_spec == "help@shop.example.com"
    assert message["MIME-Version"] == "1.0"


def test_list_unsubscribe_has_https_and_mailto_with_one_click() -> None:
    message = _parse(_render(_emailing(), ZOE))

    unsubscribe = message["List-Unsubscribe"]
    https, mailto = (part.strip(" <>") for part in unsubscribe.split(","))
    assert https == tokens.unsubscribe_url(345)
    assert mailto.startswith("mailto:")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "=?" not in unsubscribe


def test_no_line_is_longer_than_998_characters() -> None:
    long_line = "<p>" + "x" * 5000 + " é" + "</p>"
    emailing = _emailing(html=f"<html><body>{long_line}</body></html>", message="")
    raw = _render(emailing, ZOE).as_bytes()

    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    html = _parse(_render(emailing, ZOE)).get_body(("html",))
    assert html is not None and "x" * 5000 + " é" in html.get_content()


def test_newline_in_subject_cannot_add_a_header() -> None:
    emailing = _emailing(subject="Promo\r\nBcc: victim@example.com\nX-Evil: 1")
    message = _parse(_render(emailing, ZOE))

    assert message["Bcc"] is None
    assert message["X-Evil"] is None
    assert message["Subject"] == "Promo Bcc: victim@example.com X-Evil: 1"


def test_newline_in_recipient_name_cannot_add_a_header() -> None:
    evil = Recipient(
        email="eve@example.com",
        name="Eve\r\nBcc: victim@example.com",
        delivery_id=7,
    )
    emailing = _emailing(subject="Hello {contact.name}")
    message = _parse(_render(emailing, evil))

    assert message["Bcc"] is None
    assert [a.addr_spec for a in message["To"].addresses] == ["eve@example.com"]
    assert "\n" not in message["Subject"]


def test_one_line_removes_every_kind_of_line_break() -> None:
    assert one_line("a\rb\nc\u2028d\x0be\x00f") == "a b c d ef"


def test_text_part_comes_from_the_html_when_the_message_is_empty() -> None:
    emailing = _emailing(message="")
    text = _parse(_render(emailing, ZOE)).get_body(("plain",))

    assert text is not None
    content = text.get_content()
    assert "Bonjour Zoé Łukasiewicz (Paris)" in content
    assert "<p>" not in content


def test_html_part_comes_from_the_text_when_there_is_no_html() -> None:
    emailing = _emailing(
        html="", message="Hi {contact.name}\n\nSee https://x.example.com/a"
    )
    html = _parse(_render(emailing, ZOE, test=False)).get_body(("html",))

    assert html is not None
    content = html.get_content()
    assert "Hi Zoé Łukasiewicz" in content
    assert "/t/c/" in content


def test_tracking_rewrites_links_and_adds_the_pixel() -> None:
    html = _parse(_render(_emailing(), ZOE)).get_body(("html",))
    assert html is not None
    content = html.get_content()

    assert "https://shop.example.com/soldes" not in content
    assert tokens.click_url(345, 1) in content.replace("&amp;", "&")
    assert tokens.open_url(345) in content
    assert 'href="mailto:help@shop.example.com"' in content
    # The unsubscribe link is not a click: it stays the unsubscribe URL.
    assert tokens.unsubscribe_url(345) in content


def test_tracking_off_leaves_links_and_adds_no_pixel() -> None:
    html = _parse(_render(_emailing(tracking=False), ZOE)).get_body(("html",))
    assert html is not None
    content = html.get_content()

    assert 'href="https://shop.example.com/soldes?a=1&amp;b=2"' in content
    assert "/t/o/" not in content


def test_test_message_is_marked_and_carries_test_tokens() -> None:
    tester = Recipient(email="boss@example.com", name="Boss")
    message = _parse(_render(_emailing(), tester, test=True))

    assert message[TEST_HEADER] == "yes"
    assert message["Subject"].startswith("[Test] Bonjour Boss")
    html = message.get_body(("html",))
    assert html is not None
    unsubscribe = message["List-Unsubscribe"].strip("<>")
    payload = tokens.read_token("unsubscribe", unsubscribe.rsplit("/", 1)[1])
    assert payload is not None and payload.test and payload.delivery_id is None
    assert tokens.open_url_for_test(12) in html.get_content()


def test_recipient_message_needs_its_delivery() -> None:
    with pytest.raises(SendError, match="needs its delivery"):
        _render(_emailing(), Recipient(email="x@example.com"))


def test_international_domain_is_written_in_ascii() -> None:
    assert make_address("", "anne@bücher.example").addr_spec == (
        "anne@xn--bcher-kva.example"
    )


def test_international_domain_keeps_its_sharp_s() -> None:
    # IDNA 2003 would map it to "ss": strasse.de is someone else's domain.
    assert make_address("", "bob@straße.de").addr_spec == "bob@xn--strae-oqa.de"


@pytest.mark.parametrize(
    "address",
    ["a@b@example.com", "a b@example.com", "<a@example.com>", "a@example.com, c@x.io"],
)
def test_address_that_is_not_one_mailbox_is_refused(address: str) -> None:
    with pytest.raises(SendError, match="is not valid"):
        make_address("", address)


def test_non_ascii_mailbox_is_refused() -> None:
    with pytest.raises(SendError, match="non-ASCII mailbox"):
        make_address("", "zoé@example.com")


def test_mailbox_that_reads_as_an_encoded_word_is_refused() -> None:
    with pytest.raises(SendError, match="reads as an encoded word"):
        make_address("", "=?utf-8?q?ceo=40bank.example?=@attacker.example")


def test_address_without_a_name_is_written_as_checked() -> None:
    message = compose(
        subject="s",
        text="t",
        html="<p>t</p>",
        sender=make_address("", "news@shop.example.com"),
        recipient=make_address("", "a.b+c@example.com"),
        reply_to=make_address("", "help@shop.example.com"),
        message_id="<1@shop.example.com>",
        date=NOW,
    )

    raw = message.as_bytes()

    assert b"\r\nTo: a.b+c@example.com\r\n" in raw
    assert b"\r\nReply-To: help@shop.example.com\r\n" in raw
    assert raw == message.message().as_bytes()


def test_compose_writes_plain_headers_as_given() -> None:
    message = compose(
        subject="Plain subject",
        text="hello",
        html="<p>hello</p>",
        sender=make_address("Shop", "news@shop.example.com"),
        recipient=make_address("Ann Lee", "ann@example.com"),
        reply_to=None,
        message_id="<1@shop.example.com>",
        date=NOW,
    )
    raw = message.as_bytes()

    assert b"\r\nTo: Ann Lee <ann@example.com>\r\n" in raw
    assert b"Subject: Plain subject\r\n" in raw
    assert message.message()["Reply-To"] is None


SAME_LINKS_EVERY_TIME = [
    '<p>Hi {contact.name}</p><a href="https://shop.example.com/a?b=1&amp;c=2">A</a>',
    "<p><a href='{unsubscribe_url}'>Leave</a> {contact.city}</p></body>",
    "{contact.name}<a href=https://shop.example.com/x>x</a> -{contact.city}>",
]
LINKS_PER_RECIPIENT = [
    "<!-- {contact.name} --><a href=https://shop.example.com/x>x</a>",
    '<a href="https://shop.example.com/?u={contact.email}">Mine</a>',
    '<a title="{contact.name}" href="https://shop.example.com/">Shop</a>',
    "<a href={unsubscribe_url}>Leave</a>",
    '<{contact.city} href="https://shop.example.com/">x</a>',
    "<!-- {contact.name} <a href='https://shop.example.com/'>x</a>",
]
ODD_VALUES = ["Zoé", '"><a href="https://evil.example/">x</a>', "--", "&amp;", ""]


@pytest.mark.parametrize("html", SAME_LINKS_EVERY_TIME + LINKS_PER_RECIPIENT)
@pytest.mark.parametrize("message", ["", "Hi {contact.name} {unsubscribe_url}"])
def test_links_tracked_once_give_the_message_rendered_alone(
    html: str, message: str
) -> None:
    draft = Draft.from_emailing(_emailing(html=html, message=message))
    ids: dict[str, int] = {}

    def link_ids(url: str) -> int:
        return ids.setdefault(url, len(ids) + 1)

    for value in ODD_VALUES:
        recipient = Recipient("zoe@example.com", value, {"city": value}, 345)
        once = draft.compose(recipient, link_ids=link_ids, now=NOW)
        alone = draft._render_each(recipient, link_ids=link_ids, now=NOW)
        assert once.as_bytes() == alone.as_bytes()


@pytest.mark.parametrize("html", LINKS_PER_RECIPIENT)
def test_variable_in_a_tag_tracks_links_per_message(html: str) -> None:
    draft = Draft.from_emailing(_emailing(html=html))
    body = draft._body(lambda url: 1)

    assert body is not None and body.tracked is None


@pytest.mark.parametrize("html", SAME_LINKS_EVERY_TIME)
def test_variables_in_text_track_links_once(html: str) -> None:
    draft = Draft.from_emailing(_emailing(html=html))
    body = draft._body(lambda url: 1)

    assert body is not None and body.tracked is not None


SUBJECTS = [
    "Plain subject",
    "Été : -20 % sur tout 🎉",
    "A long subject " * 12,
    "  spaced   out  ",
    "Prix =? 100 ?= promo",
    "=?utf-8?q?looks_encoded?=",
    "News for =?utf-8?b?eA0KQmNjOiBldmlsQGV4YW1wbGUuY29t?=",
    'Quotes " and \\ and, commas',
    "Café crème " * 20,
    "Привет мир как дела у тебя сегодня " * 5,
    "A long subject with an unbreakable " + "w" * 120 + " and more " + "z" * 90,
]
NAMES = [
    "",
    "Ann Lee",
    "Zoé Łukasiewicz",
    'Lee, "Ann"',
    "O'Brien (shop)",
    "x" * 90,
    "Joe =?utf-8?q?=22?= x",
    "=?utf-8?q?x@evil.example?=",
    "=?utf-8?b?eA0KQmNjOiBldmlsQGV4YW1wbGUuY29t?=",
    "Ann Lee, customer of the month, congratulations from the whole team at the "
    'shop <evil@attacker.example>, "x',
    "N" * 80 + '"',
    "N" * 1200,
    "Zoé " * 40,
]
BODIES = [
    "hello",
    "Bonjour,\r\n\r\nNos nouveautés.\r\n",
    "a line of exactly seventy-eight characters, no more, no less, for a 7bit bod\n",
    "a long line " * 40 + "\n.\nFrom here\n\tTab\x0bvt\x0cff\rcr only\n",
    "",
    "emoji 🎉 and trailing spaces   \n   \n",
    "a NUL\x00 character\n",
]


def _display_name(raw: bytes, name: str, parsed: str) -> str:
    """The display name of header ``name`` as a reader decodes it.

    Python's parser puts a space between encoded words of a name (RFC 2047
    says to drop it); ``decode_header`` reads them as the standard says.
    """
    value = BytesParser(policy=compat32).parsebytes(raw)[name]
    if not value.startswith("=?"):
        return parsed
    decoded = str(make_header(decode_header(value)))
    return decoded.rsplit(" <", 1)[0]


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("body", BODIES)
def test_composed_bytes_are_what_the_email_package_writes(
    subject: str, name: str, body: str
) -> None:
    composed = compose(
        subject=subject,
        text=body,
        html=f"<p>{body}</p>",
        sender=make_address("Boutique Été", "news@shop.example.com"),
        recipient=make_address(name, "ann@example.com"),
        reply_to=make_address(name, "help@shop.example.com") if name else None,
        message_id="<e1.d2.abc@shop.example.com>",
        date=NOW,
        unsubscribe=(
            [
                "https://mail.shop.example.com/t/u/" + "a" * 120,
                "mailto:unsubscribe@shop.example.com?subject=unsubscribe%20x",
            ]
            if name
            else None
        ),
        headers={TEST_HEADER: "yes"} if body else None,
    )

    raw = composed.as_bytes()

    assert raw == composed.message().as_bytes()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert b"\x00" not in raw
    assert "Bcc" not in parsed
    assert parsed["Subject"] == one_line(subject)
    (to,) = parsed["To"].addresses
    assert to.addr_spec == "ann@example.com"
    assert _display_name(raw, "To", to.display_name) == one_line(name)
    text = parsed.get_body(("plain",)).get_content()
    assert text.replace("\r\n", "\n") == (
        body.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n") + "\n"
    )
