"""The engine: sequences run once per event, after the write, within limits."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import factories
import pytest
from factories import NOW
from sqlalchemy import Engine, func
from sqlalchemy.exc import DataError
from sqlmodel import Session, select

from sequencer import dryrun, runlog
from sequencer import engine as sequence_engine
from sequencer.entities import create_entity
from sequencer.enums import EventStatus, RunOutcome
from sequencer.models import Emailing, Event, Record, Sender, Sequence, SequenceRun
from sequencer.records import create_record, get_record, update_record
from sequencer.sequences import SequenceIn, save_sequence


@pytest.fixture
def shop(session: Session) -> dict[str, int]:
    """Produits, a sender, a list and the Stock bas sequence."""
    factories.products(session)
    sender_id = factories.sender(session)
    list_id = factories.contact_list(session)
    sequence = factories.stock_sequence(session, sender_id, list_id)
    return {"sender": sender_id, "list": list_id, "sequence": sequence.id}


def runs(session: Session) -> list[SequenceRun]:
    return list(session.exec(select(SequenceRun).order_by(SequenceRun.id)))


def emailings(session: Session) -> list[Emailing]:
    return list(session.exec(select(Emailing).order_by(Emailing.id)))


def test_update_below_threshold_creates_an_emailing(
    session: Session, shop: dict
) -> None:
    record = factories.product(session, name="Café <bio>")

    result = update_record(session, "produits", record["id"], {"quantite": 9}, now=NOW)

    (emailing,) = emailings(session)
    assert result.summary() == f"1 sequence ran: emailing {emailing.id} created"
    assert emailing.subject == "Stock bas : Café <bio>"
    assert emailing.html == "<p>Il reste 9 <b>Café &lt;bio&gt;</b></p>"
    assert emailing.message == "Il reste 9 Café <bio>. Bonjour {contact.name}"
    assert emailing.reference == f"produits/{record['id']}"
    assert emailing.sequence_id == shop["sequence"]
    assert emailing.send_at == NOW and emailing.status.value == "pending"
    assert emailing.contact_lists == [shop["list"]]
    (run,) = runs(session)
    assert run.outcome is RunOutcome.DONE
    assert run.records == [
        {"entity": "emailing", "id": emailing.id, "action": "create"}
    ]


def test_update_of_another_property_does_not_fire(session: Session, shop: dict) -> None:
    record = factories.product(session, quantite=5)

    result = update_record(session, "produits", record["id"], {"prix": 3}, now=NOW)

    assert result.event_id is not None and result.runs == []
    assert runs(session) == [] and emailings(session) == []


def test_unchanged_watched_value_does_not_fire(session: Session, shop: dict) -> None:
    record = factories.product(session, quantite=120)

    result = update_record(session, "produits", record["id"], {"quantite": "120"})

    assert result.event_id is None and runs(session) == []


def test_conditions_not_met_log_a_skipped_run(session: Session, shop: dict) -> None:
    record = factories.product(session)

    update_record(session, "produits", record["id"], {"quantite": 50}, now=NOW)

    (run,) = runs(session)
    assert run.outcome is RunOutcome.SKIPPED
    assert run.message == "conditions not met: quantite < 10"
    assert emailings(session) == []


def test_failing_sequence_never_undoes_the_write(session: Session, shop: dict) -> None:
    record = factories.product(session)
    session.delete(session.get(Sender, shop["sender"]))
    session.commit()

    result = update_record(session, "produits", record["id"], {"quantite": 2}, now=NOW)

    assert get_record(session, "produits", record["id"])["quantite"] == 2
    (run,) = runs(session)
    assert run.outcome is RunOutcome.ERROR
    assert "emailing: sender: no such sender" in run.message
    assert "sequence 'Stock bas' failed" in result.summary()
    assert session.get(Event, result.event_id).status is EventStatus.PROCESSED


def test_pending_events_run_on_the_next_pass(
    engine: Engine, session: Session, shop: dict
) -> None:
    record = factories.product(session)
    update_record(
        session, "produits", record["id"], {"quantite": 3}, now=NOW, run_sequences=False
    )
    assert runs(session) == []

    processed = sequence_engine.process_pending(engine, now=NOW)

    assert processed == 1
    session.expire_all()
    assert len(emailings(session)) == 1
    assert sequence_engine.process_pending(engine, now=NOW) == 0


def test_stale_claim_is_taken_over_without_running_twice(
    engine: Engine, session: Session, shop: dict
) -> None:
    record = factories.product(session)
    result = update_record(
        session, "produits", record["id"], {"quantite": 3}, now=NOW, run_sequences=False
    )
    event = session.get(Event, result.event_id)
    event.status, event.claimed_by = EventStatus.PROCESSING, "dead-worker"
    event.claimed_at = NOW - timedelta(hours=1)
    session.add(event)
    session.commit()

    assert sequence_engine.process_pending(engine, now=NOW, worker_id="w2") == 1

    session.expire_all()
    assert len(emailings(session)) == 1 and len(runs(session)) == 1


def test_existing_run_is_never_repeated(
    engine: Engine, session: Session, shop: dict
) -> None:
    record = factories.product(session)
    result = update_record(
        session, "produits", record["id"], {"quantite": 3}, now=NOW, run_sequences=False
    )
    session.add(
        SequenceRun(
            sequence_id=shop["sequence"],
            event_id=result.event_id,
            outcome=RunOutcome.DONE,
        )
    )
    session.commit()

    sequence_engine.process_pending(engine, now=NOW)

    session.expire_all()
    assert emailings(session) == [] and len(runs(session)) == 1


def test_two_workers_never_run_a_sequence_twice_on_one_event(
    engine: Engine, session: Session, shop: dict
) -> None:
    ids = [factories.product(session, name=f"P{n}")["id"] for n in range(40)]
    for record_id in ids:
        update_record(
            session,
            "produits",
            record_id,
            {"quantite": 1},
            now=NOW,
            run_sequences=False,
        )
    barrier = threading.Barrier(2)
    counts: list[int] = []

    def worker(name: str) -> None:
        barrier.wait()
        counts.append(sequence_engine.process_pending(engine, now=NOW, worker_id=name))

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    session.expire_all()
    assert sum(counts) == 40
    assert len(emailings(session)) == 40 and len(runs(session)) == 40
    pairs = session.exec(select(SequenceRun.sequence_id, SequenceRun.event_id)).all()
    assert len(set(pairs)) == 40


def test_action_writes_roll_back_with_their_failed_run(session: Session) -> None:
    factories.clients_and_orders(session)
    sender_id, list_id = factories.sender(session), factories.contact_list(session)
    ok, closed = (
        create_record(
            session,
            "emailing",
            {"subject": "Commande", "message": "x", "sender": sender_id,
             "contact_list": [list_id], "send_at": "now"},
            reference="CMD-1",
        ).record["id"]
        for _ in range(2)
    )  # fmt: skip
    sent = session.get(Emailing, closed)
    sent.status = "sent"
    session.add(sent)
    session.commit()
    save_sequence(
        session,
        SequenceIn(
            name="Statut dans l'emailing",
            trigger_entity="commandes",
            watched_property="statut",
            target_entity="emailing",
            target_action="update",
            fields={"subject": "Commande {numero} : {statut}"},
            reference="{numero}",
        ),
    )
    order = create_record(session, "commandes", {"numero": "CMD-1"}).record

    update_record(session, "commandes", order["id"], {"statut": "livrée"}, now=NOW)

    session.expire_all()
    assert session.get(Emailing, ok).subject == "Commande"
    (run,) = runs(session)
    assert run.outcome is RunOutcome.ERROR and "can no longer change" in run.message


def test_update_action_finds_its_target_by_id(session: Session) -> None:
    factories.clients_and_orders(session)
    client = create_record(session, "clients", {"nom": "Bistrot"}).record
    save_sequence(
        session,
        SequenceIn(
            name="Dernière commande",
            trigger_entity="commandes",
            watched_property="statut",
            conditions=[
                {"property": "statut", "operator": "changed_to", "value": "livrée"}
            ],
            target_entity="clients",
            target_action="update",
            fields={"derniere_commande": "{numero}"},
            reference="{client_id}",
        ),
    )
    order = create_record(
        session, "commandes", {"numero": "CMD-7", "client_id": client["id"]}
    ).record

    result = update_record(session, "commandes", order["id"], {"statut": "livrée"})

    assert get_record(session, "clients", client["id"])["derniere_commande"] == "CMD-7"
    assert result.summary() == f"1 sequence ran: clients {client['id']} updated"


def test_update_action_with_no_match_is_skipped(session: Session) -> None:
    factories.clients_and_orders(session)
    save_sequence(
        session,
        SequenceIn(
            name="Client introuvable",
            trigger_entity="commandes",
            trigger_action="create",
            target_entity="clients",
            target_action="update",
            fields={"derniere_commande": "{numero}"},
            reference="{client_id}",
        ),
    )

    create_record(session, "commandes", {"numero": "CMD-8", "client_id": 404})

    (run,) = runs(session)
    assert run.outcome is RunOutcome.SKIPPED
    assert run.message == "no clients record to change"


def test_a_sequence_runs_once_per_record_in_a_cascade(session: Session) -> None:
    factories.products(session)
    save_sequence(
        session,
        SequenceIn(
            name="Hausse",
            trigger_entity="produits",
            target_entity="produits",
            target_action="update",
            fields={"prix": "{{ (prix or 0) + 1 }}"},
        ),
    )
    record = factories.product(session, prix=10)

    update_record(session, "produits", record["id"], {"quantite": 1})

    assert get_record(session, "produits", record["id"])["prix"] == 11
    outcomes = [(run.outcome, run.message) for run in runs(session)]
    assert outcomes == [
        (RunOutcome.DONE, f"updated produits {record['id']}"),
        (RunOutcome.SKIPPED, f"already ran on produits/{record['id']} in this cascade"),
    ]


def test_a_cascade_stops_at_depth_five(session: Session) -> None:
    for number in range(1, 8):
        create_entity(session, name=f"e{number}", properties=[{"name": "v"}])
    for number in range(1, 7):
        save_sequence(
            session,
            SequenceIn(
                name=f"e{number} -> e{number + 1}",
                trigger_entity=f"e{number}",
                trigger_action="create",
                target_entity=f"e{number + 1}",
                target_action="create",
                fields={"v": "{v}"},
            ),
        )

    result = create_record(session, "e1", {"v": "x"})

    outcomes = [run.outcome for run in result.runs]
    assert outcomes == [RunOutcome.DONE] * 5 + [RunOutcome.ERROR]
    assert "cascade stopped at depth 5" in result.runs[-1].message
    assert session.exec(select(func.count()).select_from(Record)).one() == 6


def test_rendered_list_and_send_time_are_typed(session: Session) -> None:
    factories.products(session)
    sender_id = factories.sender(session)
    first, second = (
        factories.contact_list(session, "A"),
        factories.contact_list(session, "B"),
    )
    save_sequence(
        session,
        SequenceIn(
            name="Nouveau produit",
            trigger_entity="produits",
            trigger_action="create",
            target_entity="emailing",
            fields={
                "subject": "Nouveau : {name}",
                "message": "x",
                "sender": str(sender_id),
                "contact_list": f"[{{list_id}}, {second}]",
                "send_at": "{created_at} +1d",
            },
        ),
    )

    create_record(session, "produits", {"name": "Thé", "list_id": first}, now=NOW)

    (emailing,) = emailings(session)
    assert emailing.contact_lists == [first, second]
    assert emailing.send_at == NOW + timedelta(days=1)


def test_send_at_typed_in_user_zone_is_stored_in_utc(
    session: Session, shop: dict
) -> None:
    save_sequence(
        session,
        SequenceIn(
            name="Stock bas",
            trigger_entity="produits",
            watched_property="quantite",
            target_entity="emailing",
            fields={"subject": "s", "message": "m", "sender": str(shop["sender"]),
                    "send_at": "05/07/2026 10:00"},
        ),
        sequence_id=shop["sequence"],
    )  # fmt: skip
    record = factories.product(session)

    update_record(session, "produits", record["id"], {"quantite": 1})

    (emailing,) = emailings(session)
    assert emailing.send_at == datetime(2026, 7, 5, 8, 0, tzinfo=UTC)


def test_dry_run_shows_conditions_and_fields_without_writing(
    session: Session, shop: dict
) -> None:
    record = factories.product(session, name="Thé", quantite=4)
    sequence = session.get(Sequence, shop["sequence"])

    result = dryrun.dry_run(session, sequence, record["id"], now=NOW)

    assert [(c.condition, c.result) for c in result.conditions] == [
        ("quantite < 10", True)
    ]
    assert result.fields["subject"] == "Stock bas : Thé"
    assert result.would_run and result.errors == []
    assert emailings(session) == [] and runs(session) == []


def test_dry_run_reports_a_field_that_would_fail(session: Session, shop: dict) -> None:
    record = factories.product(session, quantite=50)
    data = SequenceIn(
        name="Essai",
        trigger_entity="produits",
        target_entity="emailing",
        fields={
            "subject": "s",
            "message": "m",
            "sender": "{quantite}",
            "send_at": "now",
        },
    )

    result = dryrun.dry_run(session, data, record["id"], now=NOW)

    assert not result.would_run
    assert result.errors == ["emailing: sender: no such sender (50)"]


def test_run_log_lists_errors_first(session: Session, shop: dict) -> None:
    first = factories.product(session, name="A")
    update_record(session, "produits", first["id"], {"quantite": 50})
    session.delete(session.get(Sender, shop["sender"]))
    session.commit()
    update_record(session, "produits", first["id"], {"quantite": 5})

    log = runlog.list_runs(session)

    assert list(log["outcome"]) == ["error", "skipped"]
    assert log.loc[0, "changed"] == "quantite" and log.loc[0, "entity"] == "produits"


@pytest.mark.parametrize("reference", ["²", "٣", "99999999999999999999"])
def test_update_action_with_an_odd_numeric_reference_is_skipped_cleanly(
    session: Session, reference: str
) -> None:
    factories.clients_and_orders(session)
    create_record(session, "clients", {"nom": "Bistrot"})
    save_sequence(
        session,
        SequenceIn(
            name="Par statut",
            trigger_entity="commandes",
            trigger_action="create",
            target_entity="clients",
            target_action="update",
            fields={"derniere_commande": "{numero}"},
            reference="{statut}",
        ),
    )

    create_record(session, "commandes", {"numero": "CMD-9", "statut": reference})

    (run,) = runs(session)
    assert (run.outcome, run.message) == (
        RunOutcome.SKIPPED,
        "no clients record to change",
    )


def test_run_refused_by_the_database_is_logged_as_an_error(
    session: Session, shop: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    product = factories.product(session, name="Café", quantite=50)

    def refuse(*args: object, **kwargs: object) -> None:
        raise DataError("INSERT ...", {}, Exception("value too long"))

    monkeypatch.setattr(sequence_engine, "_act", refuse)
    update_record(session, "produits", product["id"], {"quantite": 5}, now=NOW)

    (run,) = runs(session)
    assert run.outcome is RunOutcome.ERROR
    assert run.message == "the database refused the write: value too long"
    assert get_record(session, "produits", product["id"])["quantite"] == 5


def test_send_at_a_day_after_creation_keeps_the_hour_across_a_clock_change(
    session: Session,
) -> None:
    factories.products(session)
    sender_id, list_id = factories.sender(session), factories.contact_list(session)
    save_sequence(
        session,
        SequenceIn(
            name="Relance",
            trigger_entity="produits",
            trigger_action="create",
            target_entity="emailing",
            fields={
                "subject": "{name}",
                "message": "x",
                "sender": str(sender_id),
                "contact_list": f"[{list_id}]",
                "send_at": "{created_at} +1d",
            },
        ),  # fmt: skip
    )
    saturday = datetime(2026, 10, 24, 7, 0, tzinfo=UTC)  # 09:00 in Paris

    create_record(session, "produits", {"name": "Thé"}, now=saturday)

    (emailing,) = emailings(session)
    assert emailing.send_at == datetime(2026, 10, 25, 8, 0, tzinfo=UTC)
