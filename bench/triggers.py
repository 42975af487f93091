"""How much do sequences cost a CSV import?

Imports 10,000 product updates from CSV twice, each time on a fresh database
holding the same 10,000 products: once with no sequence, once with 20 active
sequences. Half of the sequences match these updates: they trigger on Produits
Update watching ``quantite`` (which every row changes), so each of the 10 is
evaluated and logs a run on every row; their conditions (``quantite < 10`` and
one category each) let exactly one of them act per row, creating an alert
record. The other half do not match: they watch ``prix`` (unchanged) or
trigger on Commandes. Per row that is one update, ten runs logged, one alert
created and its event. The last line prints the ratio of the two import times,
with / without. Target: at most 3.

    python bench/triggers.py [--rows 10000] [--url postgresql://...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlmodel import Session, SQLModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sequencer import db  # noqa: E402
from sequencer.csv_import import import_csv  # noqa: E402
from sequencer.entities import create_entity  # noqa: E402
from sequencer.models import Entity, Record, SequenceRun  # noqa: E402
from sequencer.sequences import SequenceIn, save_sequence  # noqa: E402
from sequencer.system import ensure_system_entities  # noqa: E402

PRODUCT_PROPERTIES = [
    {"name": "sku", "type": "text", "required": True},
    {"name": "name", "type": "text", "required": True},
    {"name": "categorie", "type": "text"},
    {"name": "quantite", "type": "number"},
    {"name": "prix", "type": "number"},
]
ORDERS = [
    {"name": "sku", "type": "text"},
    {"name": "name", "type": "text"},
    {"name": "quantite", "type": "number"},
    {"name": "prix", "type": "number"},
]
ALERT_PROPERTIES = [
    {"name": "produit", "type": "text"},
    {"name": "quantite", "type": "number"},
    {"name": "message", "type": "text"},
]


CATEGORIES = [
    "Épicerie",
    "Boissons",
    "Hygiène",
    "Maison",
    "Jardin",
    "Bricolage",
    "Papeterie",
    "Jouets",
    "Textile",
    "Animalerie",
]


def products_csv(rows: int, quantity: int) -> bytes:
    """Products with French decimals; ``quantity`` sets the stock level."""
    lines = ["sku;name;categorie;quantite;prix"]
    for number in range(rows):
        category = CATEGORIES[number % len(CATEGORIES)]
        lines.append(
            f"SKU-{number:05d};Produit {number};{category};"
            f"{quantity + number % 5};{number % 50},{number % 100:02d}"
        )
    return ("\n".join(lines) + "\n").encode("utf-8")


def sequences() -> list[SequenceIn]:
    """Ten sequences that match product updates, ten that do not."""
    alert = {
        "produit": "{sku}",
        "quantite": "{quantite}",
        "message": "Stock bas : {name} ({quantite} restants)",
    }
    result = []
    for number, category in enumerate(CATEGORIES):
        result.append(
            SequenceIn(
                name=f"Stock bas {category}",
                trigger_entity="produits",
                watched_property="quantite",
                conditions=[
                    {"property": "quantite", "operator": "lt", "value": "10"},
                    {"property": "categorie", "operator": "equals", "value": category},
                ],
                target_entity="alertes",
                fields=alert,
            )
        )
        other = (
            {"trigger_entity": "produits", "watched_property": "prix"}
            if number % 2
            else {"trigger_entity": "commandes", "trigger_action": "create"}
        )
        result.append(
            SequenceIn(
                name=f"Autre {number}", target_entity="alertes", fields=alert, **other
            )
        )
    return result


def prepare(url: str, rows: int, with_sequences: bool) -> db.Engine:
    engine = db.make_engine(url)
    db.create_schema(engine)
    with Session(engine, expire_on_commit=False) as session:
        ensure_system_entities(session)
        session.commit()
        create_entity(
            session, name="produits", label="Produits", properties=PRODUCT_PROPERTIES
        )
        create_entity(
            session, name="alertes", label="Alertes", properties=ALERT_PROPERTIES
        )
        create_entity(session, name="commandes", label="Commandes", properties=ORDERS)
        import_csv(session, "produits", products_csv(rows, 100), key="sku")
        if with_sequences:
            for data in sequences():
                save_sequence(session, data)
    return engine


def timed_import(engine: db.Engine, rows: int) -> tuple[float, float, str, int, int]:
    data = products_csv(rows, 3)
    with Session(engine, expire_on_commit=False) as session:
        started, cpu = time.perf_counter(), time.process_time()
        report = import_csv(session, "produits", data, key="sku")
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        alerts = session.scalar(
            select(func.count())
            .select_from(Record)
            .join(Entity, Entity.id == Record.entity_id)
            .where(Entity.name == "alertes")
        )
        runs = session.scalar(select(func.count()).select_from(SequenceRun))
    return elapsed, cpu, report.summary(), int(alerts or 0), int(runs or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each import; the best counts"
    )
    parser.add_argument("--url", help="an empty database (default: temporary SQLite)")
    args = parser.parse_args()

    best = {"without": float("inf"), "with": float("inf")}
    cpu_best = dict(best)
    with tempfile.TemporaryDirectory() as folder:
        for attempt in range(args.repeat):
            # Alternate the two imports so a busy machine slows both alike.
            for label, with_sequences in (("without", False), ("with", True)):
                url = args.url or f"sqlite:///{Path(folder) / f'{label}{attempt}.db'}"
                engine = prepare(url, args.rows, with_sequences)
                elapsed, cpu, summary, alerts, runs = timed_import(engine, args.rows)
                if args.url:
                    SQLModel.metadata.drop_all(engine)
                engine.dispose()
                best[label] = min(best[label], elapsed)
                cpu_best[label] = min(cpu_best[label], cpu)
                print(
                    f"{label} sequences: {elapsed:.2f} s ({cpu:.2f} s CPU) for "
                    f"{args.rows} rows ({args.rows / elapsed:.0f} rows/s); {summary}; "
                    f"{alerts} alerts, {runs} runs logged",
                    flush=True,
                )
    print(
        f"best of {args.repeat}: without {best['without']:.2f} s "
        f"({cpu_best['without']:.2f} s CPU), with {best['with']:.2f} s "
        f"({cpu_best['with']:.2f} s CPU); CPU ratio "
        f"{cpu_best['with'] / cpu_best['without']:.2f}"
    )
    ratio = best["with"] / best["without"]
    print(f"ratio {ratio:.2f} (target <= 3)")


if __name__ == "__main__":
    main()
