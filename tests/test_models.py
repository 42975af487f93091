"""The schema: migrations and models agree, and times round-trip in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine
from sqlmodel import Session, SQLModel, select

from sequencer import db
from sequencer.models import Sender


def test_migrations_build_the_schema_the_models_describe(tmp_path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'migrated.db'}")

    db.init_db(engine)

    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = compare_metadata(context, SQLModel.metadata)
    assert differences == []


def test_init_twice_changes_nothing(tmp_path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'twice.db'}")

    db.init_db(engine)
    db.init_db(engine)

    with Session(engine) as session:
        assert session.exec(select(Sender)).all() == []


def test_times_are_stored_in_utc_and_read_back_aware(engine: Engine) -> None:
    paris = timezone(timedelta(hours=1))
    with db.session_scope(engine) as session:
        sender = Sender(name="Shop", email="shop@example.com")
        sender.created_at = datetime(2026, 12, 3, 10, 0, tzinfo=paris)
        session.add(sender)

    with Session(engine) as session:
        stored = session.exec(select(Sender)).one()
    assert stored.created_at == datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    assert stored.created_at.tzinfo is not None
