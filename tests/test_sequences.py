"""Saving sequences: validated so a bad one cannot be saved; cycles warned."""

from __future__ import annotations

import factories
import pytest
from sqlmodel import Session, select

from sequencer.enums import RecordAction
from sequencer.exceptions import TemplateError, ValidationError
from sequencer.groups import create_group
from sequencer.models import Sequence
from sequencer.records import update_record
from sequencer.sequences import (
    SequenceIn,
    delete_sequence,
    duplicate_sequence,
    list_sequences,
    save_sequence,
    set_active,
)


@pytest.fixture
def ids(session: Session) -> dict[str, int]:
    factories.products(session)
    return {
        "sender": factories.sender(session),
        "list": factories.contact_list(session),
    }


def stock(ids: dict[str, int], **changes: object) -> SequenceIn:
    data = SequenceIn(
        name="Stock bas",
        trigger_entity="produits",
        watched_property="quantite",
        conditions=[{"property": "quantite", "operator": "<", "value": "10"}],
        target_entity="emailing",
        fields={
            "subject": "Stock bas : {name}",
            "message": "Il reste {quantite}",
            "sender": str(ids["sender"]),
            "contact_list": f"[{ids['list']}]",
            "send_at": "now",
        },
    )
    for name, value in changes.items():
        setattr(data, name, value)
    return data


def test_save_stores_a_valid_sequence(session: Session, ids: dict) -> None:
    result = save_sequence(session, stock(ids))

    stored = session.exec(select(Sequence)).one()
    assert stored.id == result.sequence.id and result.warnings == []
    assert stored.trigger_action is RecordAction.UPDATE
    assert stored.conditions == [
        {"property": "quantite", "operator": "lt", "value": "10"}
    ]


def test_bad_condition_value_names_sequence_condition_and_value(
    session: Session, ids: dict
) -> None:
    rules = [
        {"property": "name", "operator": "is_not_empty"},
        {"property": "quantite", "operator": "lt", "value": "abc"},
    ]

    with pytest.raises(
        ValidationError,
        match="sequence 'Stock bas': condition 2: value 'abc' is not a number",
    ):
        save_sequence(session, stock(ids, conditions=rules))
    assert session.exec(select(Sequence)).all() == []


def test_unknown_variable_is_refused_listing_the_variables(
    session: Session, ids: dict
) -> None:
    fields = {**stock(ids).fields, "subject": "Stock bas : {nom}"}

    with pytest.raises(TemplateError, match=r"subject: unknown variable \{nom\}; "
                       r"available: \{id\}, \{name\}, \{created_at\}, \{updated_at\}, "
                       r"\{update_at\}, \{sku\}"):  # fmt: skip
        save_sequence(session, stock(ids, fields=fields))


def test_update_at_alias_and_recipient_variables_are_accepted(
    session: Session, ids: dict
) -> None:
    fields = {
        **stock(ids).fields,
        "message": "{update_at} {contact.name} {unsubscribe_url}",
    }

    save_sequence(session, stock(ids, fields=fields))


def test_missing_required_emailing_field_is_refused(
    session: Session, ids: dict
) -> None:
    fields = {k: v for k, v in stock(ids).fields.items() if k != "send_at"}

    with pytest.raises(
        ValidationError, match="send_at: required: the action creates emailing records"
    ):
        save_sequence(session, stock(ids, fields=fields))


def test_unknown_sender_written_as_a_constant_is_refused(
    session: Session, ids: dict
) -> None:
    fields = {**stock(ids).fields, "sender": "999"}

    with pytest.raises(ValidationError, match="sender: no sender with id 999"):
        save_sequence(session, stock(ids, fields=fields))


def test_counter_fields_are_refused(session: Session, ids: dict) -> None:
    fields = {**stock(ids).fields, "open": "3"}

    with pytest.raises(ValidationError, match="open: maintained by the system"):
        save_sequence(session, stock(ids, fields=fields))


def test_watched_property_must_exist(session: Session, ids: dict) -> None:
    with pytest.raises(ValidationError, match="stock: no such property"):
        save_sequence(session, stock(ids, watched_property="stock"))


def test_update_of_another_entity_needs_a_reference(
    session: Session, ids: dict
) -> None:
    data = stock(ids, target_action="update", fields={"subject": "x"})

    with pytest.raises(ValidationError, match="reference: required"):
        save_sequence(session, data)


def test_names_are_unique(session: Session, ids: dict) -> None:
    save_sequence(session, stock(ids))

    with pytest.raises(ValidationError, match="another sequence has this name"):
        save_sequence(session, stock(ids))


def test_a_cycle_through_two_sequences_is_warned(session: Session) -> None:
    factories.clients_and_orders(session)
    save_sequence(
        session,
        SequenceIn(
            name="Client -> commande",
            trigger_entity="clients",
            trigger_action="create",
            target_entity="commandes",
            fields={"numero": "C-{id}"},
        ),
    )

    result = save_sequence(
        session,
        SequenceIn(
            name="Commande -> client",
            trigger_entity="commandes",
            trigger_action="create",
            target_entity="clients",
            fields={"nom": "Client {numero}"},
        ),
    )

    (warning,) = result.warnings
    assert "commandes create -> clients create -> commandes create" in warning
    assert "depth 5" in warning


def test_list_shows_runs_errors_and_filters(session: Session, ids: dict) -> None:
    sequence = save_sequence(session, stock(ids)).sequence
    record = factories.product(session)
    update_record(session, "produits", record["id"], {"quantite": 2})
    group = create_group(session, "Stock", ["produits"])

    frame = list_sequences(session, group_id=group.id)

    assert frame.loc[0, "name"] == "Stock bas" and frame.loc[0, "runs"] == 1
    assert frame.loc[0, "errors"] == 0 and frame.loc[0, "last_run"] is not None
    assert frame.loc[0, "trigger"] == "Produits · update (quantite)"
    assert list_sequences(session, active=False).empty
    set_active(session, sequence.id, False)
    assert len(list_sequences(session, active=False)) == 1


def test_duplicate_is_an_inactive_copy(session: Session, ids: dict) -> None:
    original = save_sequence(session, stock(ids)).sequence

    copy = duplicate_sequence(session, original.id)

    assert copy.name == "Stock bas (copy)" and not copy.active
    assert copy.fields == original.fields


def test_delete_removes_the_sequence_and_its_runs(session: Session, ids: dict) -> None:
    sequence = save_sequence(session, stock(ids)).sequence
    record = factories.product(session)
    update_record(session, "produits", record["id"], {"quantite": 2})

    delete_sequence(session, sequence.id)

    assert session.exec(select(Sequence)).all() == []
    assert list_sequences(session).empty


def test_watched_property_error_names_the_sequence(session: Session, ids: dict) -> None:
    with pytest.raises(
        ValidationError, match="sequence 'Stock bas': watched property: stock: "
    ):
        save_sequence(session, stock(ids, watched_property="stock"))


def test_condition_that_is_not_an_object_is_refused_naming_it(
    session: Session, ids: dict
) -> None:
    with pytest.raises(
        ValidationError, match="sequence 'Stock bas': condition 1: must be an object"
    ):
        save_sequence(session, stock(ids, conditions=["quantite < 10"]))

    assert session.exec(select(Sequence)).all() == []


@pytest.mark.parametrize("status", ["sent", "sending", "whatever"])
def test_emailing_status_set_by_the_system_is_refused_at_save(
    session: Session, ids: dict, status: str
) -> None:
    fields = {**stock(ids).fields, "status": status}

    with pytest.raises(ValidationError, match="status: .* choose draft or pending"):
        save_sequence(session, stock(ids, fields=fields))

    assert session.exec(select(Sequence)).all() == []


def test_emailing_status_draft_is_accepted(session: Session, ids: dict) -> None:
    fields = {**stock(ids).fields, "status": "draft"}

    assert save_sequence(session, stock(ids, fields=fields)).sequence.id
