"""CSV import: every local flavour of spreadsheet, bad rows reported, good kept."""

from __future__ import annotations

from datetime import date

import factories
import pytest
from factories import NOW
from sqlmodel import Session, select

from sequencer.csv_import import import_csv, preview_csv
from sequencer.entities import create_entity
from sequencer.exceptions import ImportFileError
from sequencer.models import Contact, Emailing, Sender
from sequencer.records import list_records


@pytest.fixture
def produits(session: Session) -> None:
    factories.products(session)


def names(session: Session) -> list[str]:
    return list(list_records(session, "produits")["name"])


def test_utf8_with_bom_and_semicolons_and_decimal_commas(
    session: Session, produits: None
) -> None:
    data = "\ufeffname;quantite;prix\nCafé;12;4,50\nThé;3;1 200,00\n".encode()

    report = import_csv(session, "produits", data)

    assert (report.created, report.rejected) == (2, [])
    assert report.encoding == "utf-8 (BOM)" and report.delimiter == ";"
    frame = list_records(session, "produits")
    assert list(frame["prix"]) == [4.5, 1200]
    assert names(session) == ["Café", "Thé"]


def test_latin1_file_with_commas(session: Session, produits: None) -> None:
    data = 'name,quantite\n"Crème brûlée",4\n'.encode("latin-1")

    report = import_csv(session, "produits", data)

    assert report.created == 1 and report.encoding.startswith("latin-1")
    assert names(session) == ["Crème brûlée"]


def test_dates_are_read_day_first(session: Session, produits: None) -> None:
    data = b"name;livraison\nA;03/04/2026\nB;2026-05-06\n"

    import_csv(session, "produits", data)

    frame = list_records(session, "produits")
    assert list(frame["livraison"]) == [date(2026, 4, 3), date(2026, 5, 6)]


def test_month_first_column_is_read_month_first_and_said(
    session: Session, produits: None
) -> None:
    data = b"name;livraison\nA;03/04/2026\nB;12/25/2026\n"

    report = import_csv(session, "produits", data)

    frame = list_records(session, "produits")
    assert list(frame["livraison"]) == [date(2026, 3, 4), date(2026, 12, 25)]
    assert "column 'livraison' has dates read month first" in report.warnings


def test_a_mix_of_date_orders_is_refused(session: Session, produits: None) -> None:
    data = b"name;livraison\nA;13/04/2026\nB;04/13/2026\n"

    with pytest.raises(ImportFileError, match=r"mixes day-first dates \(row 2: "
                       r"13/04/2026\) and month-first dates \(row 3"):  # fmt: skip
        import_csv(session, "produits", data)
    assert names(session) == []


def test_bad_rows_are_reported_and_good_rows_kept(
    session: Session, produits: None
) -> None:
    data = b"name;quantite\nA;1\nB;beaucoup\n;3\nD;4\n"

    report = import_csv(session, "produits", data)

    assert report.created == 2 and names(session) == ["A", "D"]
    assert report.rejected == [
        (3, "produits: quantite: value 'beaucoup' is not a number"),
        (4, "produits: name: required"),
    ]
    assert report.summary() == (
        "created 2, updated 0, unchanged 0, rejected 2, sequences run 0"
    )


def test_key_column_updates_existing_records(session: Session, produits: None) -> None:
    import_csv(
        session, "produits", b"sku;name;quantite\nA1;Caf\xc3\xa9;10\nB2;Th\xc3\xa9;5\n"
    )

    data = "sku;name;quantite\nA1;Café;10\nB2;Thé;6\nC3;Lait;1\n".encode()
    report = import_csv(session, "produits", data, key="sku")

    assert (report.created, report.updated, report.unchanged) == (1, 1, 1)
    assert list(list_records(session, "produits")["quantite"]) == [10, 6, 1]


def test_repeated_key_in_one_file_updates_the_first_row(
    session: Session, produits: None
) -> None:
    report = import_csv(
        session, "produits", b"sku;name;quantite\nA1;A;1\nA1;A;2\n", key="sku"
    )

    assert (report.created, report.updated) == (1, 1)
    assert list(list_records(session, "produits")["quantite"]) == [2]


def test_unknown_id_is_rejected(session: Session, produits: None) -> None:
    report = import_csv(session, "produits", b"id;name\n99;Fantome\n")

    assert report.rejected == [(2, "produits record 99 does not exist")]


def test_contacts_are_matched_by_email_case_insensitively(session: Session) -> None:
    import_csv(session, "contact", b"email,name,ville\nJean@Example.com,Jean,Lyon\n")

    report = import_csv(
        session, "contact", b"email,name,ville\nJEAN@example.COM,Jean,Nice\nbad@,X,Y\n"
    )

    assert (report.created, report.updated) == (0, 1)
    (contact,) = session.exec(select(Contact)).all()
    assert contact.email == "jean@example.com" and contact.attributes == {
        "ville": "Nice"
    }
    assert report.rejected[0][0] == 3
    assert "not an email address" in report.rejected[0][1]


def test_each_row_fires_sequences(session: Session, produits: None) -> None:
    sender_id, list_id = factories.sender(session), factories.contact_list(session)
    factories.stock_sequence(session, sender_id, list_id)
    import_csv(session, "produits", b"sku;name;quantite\nA;A;50\nB;B;50\nC;C;50\n")

    report = import_csv(
        session, "produits", b"sku;name;quantite\nA;A;5\nB;B;20\nC;C;2\n", key="sku",
        now=NOW,
    )  # fmt: skip

    assert report.sequences_run == 2
    subjects = [e.subject for e in session.exec(select(Emailing).order_by(Emailing.id))]
    assert subjects == ["Stock bas : A", "Stock bas : C"]


def test_unknown_columns_are_ignored_with_a_warning(
    session: Session, produits: None
) -> None:
    report = import_csv(session, "produits", b"name;couleur\nA;rouge\n")

    assert report.created == 1
    assert report.warnings == ["column 'couleur' is not a property of produits"]


def test_preview_shows_rows_and_types(session: Session) -> None:
    create_entity(
        session,
        name="stock",
        properties=[{"name": "nom"}, {"name": "quantite", "type": "number"}],
    )

    preview = preview_csv(b"Nom;Quantite;Autre\nA;1,5;x\nB;2;y\n", "stock", rows=1,
                          session=session)  # fmt: skip

    assert list(preview.frame.columns) == ["Nom", "Quantite", "Autre"]
    assert len(preview.frame) == 1
    assert preview.types == {
        "Nom": "nom (text)",
        "Quantite": "quantite (number)",
        "Autre": "ignored",
    }


def test_empty_file_is_refused(session: Session, produits: None) -> None:
    with pytest.raises(ImportFileError, match="the file is empty"):
        import_csv(session, "produits", b"")


def test_unclosed_quote_is_refused_naming_its_row(
    session: Session, produits: None
) -> None:
    data = b'name;quantite\nA;1\n"B;2\nC;3\nD;4\n'

    with pytest.raises(ImportFileError, match=r"row 3: a quote .* never closed"):
        import_csv(session, "produits", data)

    assert names(session) == []


def test_rows_are_numbered_as_records_when_a_cell_has_line_breaks(
    session: Session, produits: None
) -> None:
    data = b'name;quantite\n"two\nlines";1\nB;beaucoup\n'

    report = import_csv(session, "produits", data)

    assert report.created == 1
    assert report.rejected == [
        (3, "produits: quantite: value 'beaucoup' is not a number")
    ]


def test_field_longer_than_csv_limit_is_imported(
    session: Session, produits: None
) -> None:
    long_name = "x" * 200_000
    data = f"name;quantite\n{long_name};1\nB;2\n".encode()

    report = import_csv(session, "produits", data)

    assert (report.created, report.rejected) == (2, [])
    assert sorted(names(session), key=len) == ["B", long_name]


def test_utf16_file_with_bom_is_decoded(session: Session, produits: None) -> None:
    data = "name\tquantite\nCafé\t3\n".encode("utf-16")

    report = import_csv(session, "produits", data)

    assert (report.created, report.encoding) == (1, "utf-16")
    assert names(session) == ["Café"]


def test_key_matching_several_records_rejects_the_row(
    session: Session, produits: None
) -> None:
    import_csv(session, "produits", b"sku;name;quantite\nS;Same;1\nT;Same;2\n")

    report = import_csv(
        session, "produits", b"name;quantite\nSame;50\nOther;3\n", key="name"
    )

    assert report.created == 1
    assert report.rejected == [
        (2, "produits: name: 'Same' matches 2 records; the key column must name "
            "one record"),
    ]  # fmt: skip
    frame = list_records(session, "produits")
    assert sorted(frame["quantite"]) == [1, 2, 3]


def test_repeated_column_is_warned_about_once(session: Session, produits: None) -> None:
    report = import_csv(session, "produits", b"name;name\nA;B\n")

    assert report.warnings == ["column 'name' repeats 'name' and is ignored"]


def test_reference_column_is_not_taken_by_a_property_labelled_reference(
    session: Session,
) -> None:
    create_entity(
        session,
        name="stock",
        properties=[
            {"name": "sku", "label": "Référence"},
            {"name": "nom", "type": "text"},
        ],
    )

    first = import_csv(session, "stock", "sku;nom;reference\nA1;Café;lot-7\n".encode())
    second = import_csv(session, "stock", "Référence;nom\nB2;Thé\n".encode())

    assert first.warnings == [] and second.warnings == []
    frame = list_records(session, "stock")
    assert list(frame["sku"]) == ["A1", "B2"]
    assert frame["reference"].iloc[0] == "lot-7"


def test_blank_status_cell_keeps_a_contact_unsubscribed(session: Session) -> None:
    import_csv(session, "contact", b"email,name,status\nu@example.com,U,unsubscribed\n")

    report = import_csv(session, "contact", b"email,name,status\nu@example.com,V,\n")

    assert (report.updated, report.rejected) == (1, [])
    session.expire_all()
    (contact,) = session.exec(select(Contact)).all()
    assert (contact.name, contact.status) == ("V", "unsubscribed")


def test_senders_are_matched_by_email_so_a_file_cannot_duplicate_one(
    session: Session,
) -> None:
    data = b"name,email\nBoutique,shop@example.com\nBoutique bis,SHOP@example.com\n"

    report = import_csv(session, "sender", data)

    assert (report.created, report.updated, report.rejected) == (1, 1, [])
    (sender,) = session.exec(select(Sender)).all()
    assert (sender.name, sender.email) == ("Boutique bis", "shop@example.com")
