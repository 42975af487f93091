"""The dashboard pages, run by Streamlit's AppTest on the demo data set.

Each page is opened through ``app.py``'s navigation, as a user would reach it,
on a fresh database loaded with ``sequencer.demo.load_demo``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import streamlit as st
from sqlalchemy import Engine
from streamlit.testing.v1 import AppTest

from sequencer import claims, delivery, demo, entities, groups, records, sequences
from sequencer.db import session_scope
from sequencer.system import EMAILING

APP = Path(__file__).resolve().parent.parent / "app.py"
NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
TIMEOUT = 60
PAGES = [
    "pages/sequences.py",
    "pages/sequence_form.py",
    "pages/entity_groups.py",
    "pages/entities.py",
    "pages/contacts.py",
    "pages/emailings.py",
    "pages/emailing_detail.py",
    "pages/statistics.py",
    "pages/activity.py",
    "pages/settings.py",
]


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    """Statistics are cached per database URL; PostgreSQL tests share one URL."""
    st.cache_data.clear()


@pytest.fixture
def demo_db(engine: Engine) -> Engine:
    """The test database with the demo data set loaded."""
    with session_scope(engine) as session:
        demo.load_demo(session, now=NOW)
    return engine


def open_page(page: str, **query: str) -> AppTest:
    """Start the app, then go to ``page`` through its navigation."""
    app = AppTest.from_file(APP, default_timeout=TIMEOUT)
    app.run()
    app.switch_page(page)
    for name, value in query.items():
        app.query_params[name] = value
    return app.run()


def assert_clean(app: AppTest) -> None:
    """No exception and no error message on the page."""
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]


def _sequence_id(engine: Engine, name: str) -> int:
    with session_scope(engine) as session:
        table = sequences.list_sequences(session)
    return int(table.loc[table["name"] == name, "id"].iloc[0])


def _first_emailing_id(engine: Engine) -> int:
    with session_scope(engine) as session:
        table = records.list_records(session, EMAILING, limit=1)
    return int(table["id"].iloc[0])


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_on_demo_data(demo_db: Engine, page: str) -> None:
    app = open_page(page)

    assert_clean(app)
    assert app.title, f"{page} shows no title"


def test_app_opens_on_the_sequences_list(demo_db: Engine) -> None:
    app = AppTest.from_file(APP, default_timeout=TIMEOUT).run()

    assert_clean(app)
    assert app.title[0].value == "Sequences"
    assert not app.dataframe[0].value.empty


def test_page_renders_on_an_empty_database(engine: Engine) -> None:
    for page in PAGES:
        app = open_page(page)
        assert not app.exception, (page, [e.value for e in app.exception])


def test_emailing_detail_shows_recipients_and_preview(demo_db: Engine) -> None:
    emailing_id = _first_emailing_id(demo_db)

    app = open_page("pages/emailing_detail.py", id=str(emailing_id))

    assert_clean(app)
    assert [m.label for m in app.metric][:2] == ["Total", "Sent"]
    assert app.tabs[0].label == "Preview"


def test_sequences_filter_by_inactive_shows_only_inactive(demo_db: Engine) -> None:
    app = open_page("pages/sequences.py")

    app.selectbox(key="seq_filter_active").set_value("Inactive").run()

    assert_clean(app)
    if app.dataframe:
        assert not app.dataframe[0].value["active"].any()


def _fill_stock_sequence(app: AppTest, name: str, condition_value: str) -> AppTest:
    """Fill the form as the documentation reads: trigger, action, condition."""
    app.text_input(key="seq_name").input(name)
    app.selectbox(key="seq_trigger_entity").set_value("produits").run()
    app.selectbox(key="seq_watched_property").set_value("quantite")
    app.selectbox(key="seq_trigger_action").set_value("update")
    app.selectbox(key="seq_target_entity").set_value(EMAILING)
    app.selectbox(key="seq_target_action").set_value("create").run()
    app.button(key="seq_add_condition").click().run()
    row = app.session_state["seq_conditions"][0]
    app.selectbox(key=f"seq_cond_property_{row}").set_value("quantite")
    app.selectbox(key=f"seq_cond_operator_{row}").set_value("lt").run()
    app.text_input(key=f"seq_cond_value_{row}").input(condition_value)
    app.text_input(key="seq_field_subject").input("Stock bas : {name}")
    app.text_area(key="seq_field_message").input("Il reste {quantite} {name}.")
    app.text_input(key="seq_field_sender").input("1")
    app.text_input(key="seq_field_contact_list").input("[1]")
    app.text_input(key="seq_field_send_at").input("now")
    return app.run()


def test_sequence_form_creates_a_sequence(demo_db: Engine) -> None:
    app = open_page("pages/sequence_form.py")

    _fill_stock_sequence(app, "Alerte stock test", "10")
    app.button(key="seq_save").click().run()

    assert not app.exception, [e.value for e in app.exception]
    with session_scope(demo_db) as session:
        stored = sequences.get_sequence(
            session, _sequence_id(demo_db, "Alerte stock test")
        )
        assert entities.get_entity(session, stored.trigger_entity_id).name == "produits"
    assert stored.watched_property == "quantite"
    assert stored.conditions[0]["property"] == "quantite"
    assert stored.fields["subject"] == "Stock bas : {name}"


def test_sequence_form_shows_a_bad_condition_value_at_the_condition(
    demo_db: Engine,
) -> None:
    app = open_page("pages/sequence_form.py")

    _fill_stock_sequence(app, "Alerte invalide", "abc")
    app.button(key="seq_save").click().run()

    assert not app.exception
    assert any("abc" in error.value for error in app.error)
    assert "condition_1" in app.session_state["seq_errors"]
    with session_scope(demo_db) as session:
        names = set(sequences.list_sequences(session)["name"])
    assert "Alerte invalide" not in names


def test_sequence_form_shows_an_unknown_variable_at_its_field(
    demo_db: Engine,
) -> None:
    app = open_page("pages/sequence_form.py")
    _fill_stock_sequence(app, "Alerte variable", "10")

    app.text_input(key="seq_field_subject").input("Stock bas : {nom_inconnu}")
    app.button(key="seq_save").click().run()

    assert not app.exception
    assert "subject" in app.session_state["seq_errors"]
    assert any("nom_inconnu" in error.value for error in app.error)


def test_sequence_form_edits_a_sequence(demo_db: Engine) -> None:
    app = open_page("pages/sequence_form.py")
    _fill_stock_sequence(app, "Alerte a modifier", "10")
    app.button(key="seq_save").click().run()
    sequence_id = _sequence_id(demo_db, "Alerte a modifier")

    app = open_page("pages/sequence_form.py", id=str(sequence_id))
    assert app.text_input(key="seq_name").value == "Alerte a modifier"
    row = app.session_state["seq_conditions"][0]
    assert app.text_input(key=f"seq_cond_value_{row}").value == "10"
    app.text_input(key="seq_name").input("Alerte modifiee")
    app.text_input(key=f"seq_cond_value_{row}").input("5")
    app.button(key="seq_save").click().run()

    assert not app.exception
    with session_scope(demo_db) as session:
        stored = sequences.get_sequence(session, sequence_id)
    assert stored.name == "Alerte modifiee"
    assert str(stored.conditions[0]["value"]) in {"5", "5.0"}


def test_sequence_preview_runs_the_dry_run_on_a_record(demo_db: Engine) -> None:
    app = open_page("pages/sequence_form.py")
    _fill_stock_sequence(app, "Alerte apercu", "100000")

    app.button(key="seq_preview_run").click().run()

    assert not app.exception, [e.value for e in app.exception]
    assert any("conditions hold" in s.value for s in app.success)


def test_sequence_delete_asks_for_confirmation(demo_db: Engine) -> None:
    app = open_page("pages/sequences.py")
    chosen = app.selectbox(key="seq_chosen").value

    app.button(key="seq_delete").click().run()
    assert any("Delete the sequence" in w.value for w in app.warning)
    app.button(key="seq_delete_yes").click().run()

    assert not app.exception
    with session_scope(demo_db) as session:
        assert chosen not in set(sequences.list_sequences(session)["id"])


def test_record_form_saves_through_the_records_api(demo_db: Engine) -> None:
    app = open_page("pages/entities.py")
    app.selectbox(key="records_entity").set_value("produits").run()
    record_id = app.selectbox(key="records_one").value

    next(box for box in app.text_input if box.key.endswith("_quantite")).input("3")
    app.button(key=f"record_save_produits_{record_id}").click().run()

    assert not app.exception, [e.value for e in app.exception]
    with session_scope(demo_db) as session:
        record = records.get_record(session, "produits", record_id)
    assert record["quantite"] == 3


def test_csv_import_reports_each_rejected_row(demo_db: Engine) -> None:
    app = open_page("pages/entities.py")
    app.selectbox(key="import_entity").set_value("produits").run()
    content = b"sku;nom;quantite\nE2E-1;Gomme;12\nE2E-2;Regle;douze\n"

    app.file_uploader(key="import_produits_file").set_value(
        ("produits.csv", content, "text/csv")
    ).run()
    app.button(key="import_produits_run").click().run()

    assert not app.exception, [e.value for e in app.exception]
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Created"] == "1"
    assert metrics["Rejected"] == "1"
    rejected = next(
        frame.value for frame in app.dataframe if "reason" in frame.value.columns
    )
    assert list(rejected["row"]) == [3]
    assert "douze" in rejected["reason"].iloc[0]


def test_entity_group_form_creates_a_group(demo_db: Engine) -> None:
    app = open_page("pages/entity_groups.py")
    with session_scope(demo_db) as session:
        produits = entities.get_entity(session, "produits").id

    app.text_input(key="group_create_name").input("Catalogue")
    app.multiselect(key="group_create_entities").set_value([produits])
    app.button(key="group_create_submit").click().run()

    assert_clean(app)
    with session_scope(demo_db) as session:
        created = [g for g in groups.list_groups(session) if g["name"] == "Catalogue"]
    assert created and created[0]["entity_ids"] == [produits]


def test_contact_form_creates_a_contact_in_a_list(demo_db: Engine) -> None:
    app = open_page("pages/contacts.py")
    with session_scope(demo_db) as session:
        first_list = int(records.list_records(session, "contact_list")["id"].iloc[0])

    app.text_input(key="contact_email_new").input("Nouveau@Example.com")
    app.text_input(key="contact_tags_new").input("vip, test")
    app.multiselect(key="contact_lists_new").set_value([first_list])
    app.button(key="contact_save_new").click().run()

    assert_clean(app)
    with session_scope(demo_db) as session:
        found = records.list_records(session, "contact", search="nouveau@example.com")
    assert len(found) == 1
    assert set(found["tags"].iloc[0]) == {"vip", "test"}
    assert first_list in list(found["lists"].iloc[0])


def _pending_emailing(engine: Engine) -> int:
    with session_scope(engine) as session:
        sender = int(records.list_records(session, "sender")["id"].iloc[0])
        created = records.create_record(
            session,
            EMAILING,
            {
                "subject": "Test en attente",
                "message": "Bonjour {contact.name}",
                "html": '<p>Bonjour <a href="https://example.com/x">x</a></p>',
                "sender": sender,
                "all_contacts": True,
                "send_at": "2030-01-01 10:00",
            },
        )
    return int(created.record["id"])


def test_emailing_cancel_asks_then_cancels(demo_db: Engine) -> None:
    emailing_id = _pending_emailing(demo_db)
    app = open_page("pages/emailing_detail.py", id=str(emailing_id))

    app.button(key="emailing_cancel").click().run()
    assert any("Cancel this emailing" in w.value for w in app.warning)
    app.button(key="emailing_cancel_yes").click().run()

    assert_clean(app)
    with session_scope(demo_db) as session:
        stored = records.get_record(session, EMAILING, emailing_id)
    assert str(stored["status"]) == "cancelled"
    assert [info.value for info in app.info][:1] == [delivery.CANCELLED_EARLY]


def test_emailing_send_test_confirms_with_a_toast(demo_db: Engine) -> None:
    emailing_id = _pending_emailing(demo_db)
    app = open_page("pages/emailing_detail.py", id=str(emailing_id))

    app.text_input(key="emailing_test_address").input("essai@example.com")
    app.button(key="emailing_send_test").click().run()

    assert_clean(app)
    assert any("essai@example.com" in toast.value for toast in app.toast)


def test_statistics_export_offers_the_shown_table(demo_db: Engine) -> None:
    app = open_page("pages/statistics.py")

    app.date_input(key="stats_dates").set_value(
        (datetime(2026, 9, 1).date(), NOW.date())
    ).run()

    assert_clean(app)
    labels = [m.label for m in app.metric]
    assert labels[:3] == ["Sent", "Delivered", "Open rate"]
    assert int(app.metric[0].value.replace(",", "")) > 0


def test_statistics_refresh_on_their_own_while_sending(demo_db: Engine) -> None:
    emailing_id = _pending_emailing(demo_db)
    with session_scope(demo_db) as session:
        delivery.send_now(session, emailing_id, now=NOW)
    assert claims.claim_emailing(demo_db, emailing_id, worker_id="w1", now=NOW)

    app = open_page("pages/statistics.py")

    assert_clean(app)
    assert any("refreshed every" in caption.value for caption in app.caption)
