"""Small builders for core tests: entities, senders, lists, contacts, sequences."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session

from sequencer.entities import create_entity
from sequencer.records import create_record
from sequencer.sequences import SequenceIn, save_sequence

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
"""A fixed instant (10:00 in Paris) that tests pass as ``now``."""

PRODUCT_PROPERTIES = [
    {"name": "name", "type": "text", "required": True},
    {"name": "sku", "type": "text"},
    {"name": "quantite", "type": "number"},
    {"name": "prix", "type": "number"},
    {"name": "categorie", "type": "text"},
    {"name": "livraison", "type": "date"},
    {"name": "list_id", "type": "integer"},
]


def products(session: Session) -> None:
    """The Produits entity."""
    create_entity(
        session, name="produits", label="Produits", properties=PRODUCT_PROPERTIES
    )


def clients_and_orders(session: Session) -> None:
    """Clients, and Commandes that point at a client by id."""
    create_entity(
        session,
        name="clients",
        label="Clients",
        properties=[
            {"name": "nom", "type": "text", "required": True},
            {"name": "email", "type": "email"},
            {"name": "derniere_commande", "type": "text"},
        ],
        name_property="nom",
    )
    create_entity(
        session,
        name="commandes",
        label="Commandes",
        properties=[
            {"name": "numero", "type": "text", "required": True},
            {"name": "client_id", "type": "integer"},
            {"name": "statut", "type": "text"},
        ],
    )


def sender(session: Session, email: str = "shop@example.com") -> int:
    """A sender; returns its id."""
    values = {"name": "Boutique", "email": email, "reply_to": "help@example.com"}
    return create_record(session, "sender", values).record["id"]


def contact_list(session: Session, name: str = "Achats") -> int:
    """A contact list; returns its id."""
    return create_record(session, "contact_list", {"name": name}).record["id"]


def product(session: Session, **values: Any) -> dict[str, Any]:
    """A product record (sequences run); returns the record."""
    values = {"name": "Café", "quantite": 120, **values}
    return create_record(session, "produits", values, now=NOW).record


def stock_sequence(
    session: Session, sender_id: int, list_id: int, **changes: Any
) -> Any:
    """The canonical sequence: Produits Update watching quantite < 10 -> Emailing."""
    data = SequenceIn(
        name="Stock bas",
        trigger_entity="produits",
        trigger_action="update",
        watched_property="quantite",
        conditions=[{"property": "quantite", "operator": "lt", "value": "10"}],
        target_entity="emailing",
        target_action="create",
        fields={
            "subject": "Stock bas : {name}",
            "message": "Il reste {quantite} {name}. Bonjour {contact.name}",
            "html": "<p>Il reste {quantite} <b>{name}</b></p>",
            "sender": str(sender_id),
            "contact_list": f"[{list_id}]",
            "send_at": "now",
        },
    )
    for name, value in changes.items():
        setattr(data, name, value)
    return save_sequence(session, data).sequence
