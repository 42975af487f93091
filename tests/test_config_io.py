"""Configuration as code: export, import all or nothing, idempotent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import factories
import pytest
from sqlmodel import Session, select

from sequencer.config import DATA_DIR
from sequencer.config_io import export_config, import_config
from sequencer.entities import properties_of
from sequencer.exceptions import ImportFileError, ValidationError
from sequencer.groups import create_group
from sequencer.models import ContactList, Entity, Sender, Sequence
from sequencer.records import create_record, update_record

EXAMPLE = DATA_DIR / "config.example.json"


def test_example_document_imports_then_changes_nothing(session: Session) -> None:
    first = import_config(session, EXAMPLE)
    before = export_config(session)

    second = import_config(session, EXAMPLE)

    assert first.created["sequences"] == 4 and first.created["entities"] == 3
    assert not second.changed
    assert second.unchanged["sequences"] == 4
    assert export_config(session) == before


def test_export_then_import_reproduces_the_configuration(
    session: Session, tmp_path: Path
) -> None:
    factories.products(session)
    sender_id, list_id = factories.sender(session), factories.contact_list(session)
    factories.stock_sequence(session, sender_id, list_id)
    create_group(session, "Stock", ["produits", "emailing"])
    document = export_config(session)

    assert [e["name"] for e in document["entities"]] == ["produits"]
    assert document["entity_groups"] == [
        {"name": "Stock", "entities": ["emailing", "produits"]}
    ] or document["entity_groups"] == [
        {"name": "Stock", "entities": ["produits", "emailing"]}
    ]
    (sequence,) = document["sequences"]
    assert sequence["trigger"] == {"entity": "produits", "action": "update",
                                   "watch": "quantite"}  # fmt: skip
    assert import_config(session, document).changed is False


def test_sender_and_list_ids_are_mapped_to_the_receiving_database(
    session: Session,
) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    session.add(ContactList(name="Déjà là"))
    session.add(Sender(name="Autre", email="autre@example.net"))
    session.commit()

    import_config(session, document)

    achats = session.exec(
        select(ContactList).where(ContactList.name == "Équipe achats")
    )
    stock = session.exec(select(Sequence).where(Sequence.name == "Stock bas")).one()
    sender = session.exec(select(Sender).where(Sender.email == "achats@example.com"))
    assert stock.fields["contact_list"] == f"[{achats.one().id}]"
    assert stock.fields["sender"] == str(sender.one().id)


def test_invalid_document_writes_nothing(session: Session) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    document["sequences"][-1]["conditions"] = [
        {"property": "montant", "operator": "gte", "value": "beaucoup"}
    ]

    with pytest.raises(ValidationError, match="condition 1: value 'beaucoup'"):
        import_config(session, document)

    assert session.exec(select(Entity).where(Entity.system.is_(False))).all() == []
    assert session.exec(select(Sender)).all() == []
    assert session.exec(select(Sequence)).all() == []


def test_a_file_that_is_not_a_configuration_is_refused(
    session: Session, tmp_path: Path
) -> None:
    path = tmp_path / "other.json"
    path.write_text('{"hello": 1}', encoding="utf-8")

    with pytest.raises(ImportFileError, match="not a Sequencer configuration"):
        import_config(session, path)


def test_changed_property_is_updated_in_place(session: Session) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    import_config(session, document)
    document["entities"][1]["properties"][3]["label"] = "Stock"

    report = import_config(session, document)

    assert report.updated == {"entities": 1}


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda d: d.update(version="abc"), ImportFileError, "version must be"),
        (lambda d: d.update(version=None), ImportFileError, "version must be"),
        (
            lambda d: d["senders"][0].update(id="abc"),
            ValidationError,
            "sender 'bonjour@example.com': id: must be a whole number",
        ),
        (
            lambda d: d["entities"][0]["properties"].append("prix"),
            ValidationError,
            "entity 'clients': properties: must be objects",
        ),
        (
            lambda d: d["sequences"][0].update(trigger=["produits"]),
            ValidationError,
            "sequence 'Stock bas': trigger: must be an object",
        ),
        (
            lambda d: d["sequences"][0].update(conditions=["quantite < 10"]),
            ValidationError,
            "sequence 'Stock bas': conditions: must be objects",
        ),
        (
            lambda d: d["sequences"][0]["action"].update(fields="Stock bas"),
            ValidationError,
            "sequence 'Stock bas': fields: must be an object",
        ),
        (
            lambda d: d["entities"][0].update(label=["Clients"]),
            ValidationError,
            "entity 'clients': label: must be text",
        ),
        (
            lambda d: d["contact_lists"].append({"id": 1, "name": "Autre"}),
            ValidationError,
            "contact list 'Autre': id: 1 is also the id of contact list 'Newsletter'",
        ),
    ],
)
def test_misshapen_document_is_refused_naming_the_object(
    session: Session, change: Any, error: type[Exception], message: str
) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    change(document)

    with pytest.raises(error, match=message):
        import_config(session, document)

    assert session.exec(select(Entity).where(Entity.system.is_(False))).all() == []
    assert session.exec(select(Sequence)).all() == []


def test_import_refuses_a_name_twice_in_one_document(session: Session) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    twin = json.loads(json.dumps(document["sequences"][0]))
    twin["conditions"] = []
    document["sequences"].append(twin)

    with pytest.raises(ValidationError, match="sequence 'Stock bas'.*appears twice"):
        import_config(session, document)

    assert session.exec(select(Sequence)).all() == []


def test_file_that_is_not_utf8_is_refused(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes('{"format": "sequencer-config", "x": "é"}'.encode("latin-1"))

    with pytest.raises(ImportFileError, match="is not UTF-8 text"):
        import_config(session, path)


def test_flags_written_as_text_false_are_read_as_no(session: Session) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    document["sequences"][0]["active"] = "false"
    document["entities"][1]["properties"][2]["required"] = "false"

    import_config(session, document)

    stock = session.exec(select(Sequence).where(Sequence.name == "Stock bas")).one()
    assert stock.active is False
    props = {p.name: p for p in properties_of(session, "produits")}
    assert props[document["entities"][1]["properties"][2]["name"]].required is False


def test_unknown_name_property_on_an_existing_entity_is_refused(
    session: Session,
) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    import_config(session, document)
    before = export_config(session)
    document["entities"][0]["name_property"] = "nope"
    document["entities"][0]["label"] = "Changed"

    with pytest.raises(ValidationError, match="entity 'clients': name_property"):
        import_config(session, document)

    assert export_config(session) == before


def test_required_property_that_stored_records_lack_is_refused(
    session: Session,
) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    import_config(session, document)
    create_record(session, "clients", {"nom": "Durand", "email": "d@example.com"})
    before = export_config(session)
    document["entities"][0]["properties"].append(
        {"name": "siret", "type": "text", "required": True}
    )
    document["entities"][0]["label"] = "Changed"

    with pytest.raises(
        ValidationError, match="entity 'clients': siret: cannot be required: 1 stored"
    ):
        import_config(session, document)

    assert export_config(session) == before
    update_record(session, "clients", 1, {"ville": "Lyon"})


def test_numbers_where_text_is_expected_do_not_crash_the_import(
    session: Session,
) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    stock = document["sequences"][0]
    stock["trigger"]["watch"] = 5
    stock["action"]["fields"]["html"] = None

    with pytest.raises(
        ValidationError, match="sequence 'Stock bas': watched property: 5: no such"
    ):
        import_config(session, document)

    stock["trigger"]["watch"] = "quantite"
    import_config(session, document)
    saved = session.exec(select(Sequence).where(Sequence.name == "Stock bas")).one()
    assert "html" not in saved.fields


def test_entity_label_already_used_by_another_entity_is_refused(
    session: Session,
) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    twin = json.loads(json.dumps(document["entities"][0]))
    twin["name"] = "clients_bis"
    document["entities"].append(twin)

    with pytest.raises(
        ValidationError,
        match="entity 'clients_bis': label: 'Clients' is already entity 'clients'",
    ):
        import_config(session, document)

    assert session.exec(select(Entity).where(Entity.system.is_(False))).all() == []


@pytest.mark.parametrize("key", [None, True, 2.5])
def test_group_naming_an_entity_by_a_non_name_is_refused(
    session: Session, key: object
) -> None:
    document = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    document["entity_groups"][0]["entities"].append(key)

    with pytest.raises(
        ValidationError, match=f"entity group 'Ventes': entities: no entity {key!r}"
    ):
        import_config(session, document)

    assert session.exec(select(Entity).where(Entity.system.is_(False))).all() == []
