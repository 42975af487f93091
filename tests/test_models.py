"""The schema: migrations and models agree, and times round-trip in UTC."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import BACKENDS, PG_ADMIN_URL
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlmodel import Session, SQLModel, select

from sequencer import db
from sequencer.models import Sender


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An empty database with no schema at all, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrated.db'}"
        return
    name = f"seqmig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(False)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_migrations_build_the_schema_the_models_describe(empty_url: str) -> None:
    engine = db.make_engine(empty_url)

    db.init_db(engine)

    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = compare_metadata(context, SQLModel.metadata)
    engine.dispose()
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
