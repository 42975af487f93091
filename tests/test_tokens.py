"""Signed tokens: genuine ones read back, altered or swapped ones do not."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from sequencer import config, tokens
from sequencer.models import Setting


def _token(url: str) -> str:
    return url.rsplit("/", 1)[1]


@pytest.fixture
def generated_key(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """No SEQUENCER_SECRET_KEY: the key comes from the database."""
    monkeypatch.delenv("SEQUENCER_SECRET_KEY")
    config.get_settings.cache_clear()
    tokens.forget_secret_key()
    yield engine
    tokens.forget_secret_key()


def test_open_token_reads_back_its_delivery(engine: Engine) -> None:
    payload = tokens.read_token("open", _token(tokens.open_url(42)))

    assert payload == tokens.TokenPayload("open", delivery_id=42)


def test_click_token_reads_back_delivery_and_link(engine: Engine) -> None:
    payload = tokens.read_token("click", _token(tokens.click_url(42, 7)))

    assert payload == tokens.TokenPayload("click", delivery_id=42, link_id=7)


def test_urls_start_with_the_public_url(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQUENCER_PUBLIC_URL", "https://mail.example.com/")
    config.get_settings.cache_clear()

    assert tokens.open_url(1).startswith("https://mail.example.com/t/o/")
    assert tokens.click_url(1, 2).startswith("https://mail.example.com/t/c/")
    assert tokens.unsubscribe_url(1).startswith("https://mail.example.com/t/u/")


def test_altered_token_is_refused(engine: Engine) -> None:
    token = _token(tokens.open_url(42))
    payload, signature = token.split(".")
    other_payload = _token(tokens.open_url(43)).split(".")[0]

    assert tokens.read_token("open", f"{other_payload}.{signature}") is None
    assert tokens.read_token("open", f"{payload}.{signature[:-2]}xx") is None
    assert tokens.read_token("open", "not-a-token") is None
    assert tokens.read_token("open", "") is None


def test_token_of_another_kind_is_refused(engine: Engine) -> None:
    open_token = _token(tokens.open_url(42))

    assert tokens.read_token("unsubscribe", open_token) is None
    assert tokens.read_token("click", open_token) is None


def test_token_signed_with_another_key_is_refused(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = _token(tokens.unsubscribe_url(42))
    monkeypatch.setenv("SEQUENCER_SECRET_KEY", "another-key")
    config.get_settings.cache_clear()

    assert tokens.read_token("unsubscribe", token) is None


def test_test_send_tokens_are_valid_and_marked_test(engine: Engine) -> None:
    click = tokens.read_token("click", _token(tokens.click_url_for_test(9, 3)))
    unsubscribe = tokens.read_token(
        "unsubscribe", _token(tokens.unsubscribe_url_for_test(9))
    )

    assert click == tokens.TokenPayload("click", emailing_id=9, link_id=3, test=True)
    assert unsubscribe is not None and unsubscribe.test
    assert unsubscribe.delivery_id is None


def test_unknown_kind_is_a_programming_error(engine: Engine) -> None:
    with pytest.raises(ValueError, match="unknown token kind 'view'"):
        tokens.read_token("view", "abc")


def test_unsubscribe_mailto_carries_the_token(engine: Engine) -> None:
    mailto = tokens.unsubscribe_mailto(42, address="leave@example.com")

    assert mailto.startswith("mailto:leave@example.com?subject=unsubscribe%20")
    token = mailto.rsplit("%20", 1)[1]
    assert tokens.read_token("unsubscribe", token).delivery_id == 42


def test_key_is_generated_once_and_stored(generated_key: Engine) -> None:
    first = tokens.secret_key()
    tokens.forget_secret_key()
    second = tokens.secret_key()

    with Session(generated_key) as session:
        stored = session.exec(select(Setting)).all()
    assert first == second
    assert [(row.key, row.value) for row in stored] == [("secret_key", first)]
    assert len(first) >= 40


def test_key_race_between_processes_keeps_one_key(generated_key: Engine) -> None:
    keys: list[str] = []
    barrier = threading.Barrier(4)

    def read_key() -> None:
        barrier.wait()
        with Session(generated_key) as session:
            keys.append(tokens.secret_key(session))

    threads = [threading.Thread(target=read_key) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(keys) == 4
    assert len(set(keys)) == 1


def test_tokens_survive_a_restart_with_the_stored_key(generated_key: Engine) -> None:
    token = _token(tokens.click_url(5, 6))
    tokens.forget_secret_key()

    assert tokens.read_token("click", token).link_id == 6


@pytest.mark.parametrize(
    ("kind", "payload"),
    [("open", "0"), ("open", "1-2"), ("click", "7"), ("open", "x1"), ("open", "")],
)
def test_signed_payload_of_the_wrong_shape_is_refused(
    engine: Engine, kind: str, payload: str
) -> None:
    signer = tokens._signer(tokens.secret_key(), kind)
    token = signer.sign(payload).decode()

    assert tokens.read_token(kind, token) is None


def test_tokens_are_those_of_a_plain_itsdangerous_signer(engine: Engine) -> None:
    from itsdangerous import Signer

    plain = Signer(tokens.secret_key(), salt="sequencer.click")

    assert tokens.click_token(42, 7) == plain.sign("42-7").decode("ascii")
    assert tokens.read_token("click", plain.sign("42-7").decode("ascii")) == (
        tokens.TokenPayload("click", delivery_id=42, link_id=7)
    )


def test_unsubscribe_mailto_reuses_a_signed_token(engine: Engine) -> None:
    token = tokens.unsubscribe_token(42)

    assert tokens.unsubscribe_mailto(42, token=token) == tokens.unsubscribe_mailto(42)
