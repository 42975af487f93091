"""Shared fixtures: a fresh, real database per test, on SQLite and PostgreSQL.

Every test that asks for ``engine`` (or ``session``) runs once per backend in
``SEQUENCER_TEST_BACKENDS`` (default ``sqlite,postgresql``). PostgreSQL tests
get a database of their own, created for this pytest run and dropped after it,
so several runs on one server never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from smtp_server import SMTPSink
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlmodel import Session, SQLModel

from sequencer import config, db
from sequencer.system import ensure_system_entities

PG_ADMIN_URL = os.environ.get(
    "SEQUENCER_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)
BACKENDS = [
    name.strip()
    for name in os.environ.get("SEQUENCER_TEST_BACKENDS", "sqlite,postgresql").split(
        ","
    )
    if name.strip()
]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database created for this run, with the schema in place."""
    name = f"seqtest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(False)
    engine = db.make_engine(url)
    db.create_schema(engine)
    engine.dispose()
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _truncate_all(engine: Engine) -> None:
    tables = ", ".join(f'"{t.name}"' for t in SQLModel.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=BACKENDS)
def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The URL of an empty database with the schema, set as the process default.

    ``SEQUENCER_DATABASE_URL`` is pointed at it and the cached settings and
    engine are reset, so code that calls ``get_engine()`` (the scheduler, the
    tracking routes, the dashboard) uses this database too.
    """
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        engine = db.make_engine(url)
        _truncate_all(engine)
        engine.dispose()
    else:
        url = f"sqlite:///{tmp_path / 'sequencer.db'}"
        engine = db.make_engine(url)
        db.create_schema(engine)
        engine.dispose()

    monkeypatch.setenv("SEQUENCER_DATABASE_URL", url)
    monkeypatch.setenv("SEQUENCER_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("SEQUENCER_SECRET_KEY", "test-secret-key")
    monkeypatch.setenv("SEQUENCER_TIMEZONE", "Europe/Paris")
    monkeypatch.delenv("SEQUENCER_SMTP_URL", raising=False)
    config.get_settings.cache_clear()
    db.reset_engine()
    yield url
    db.reset_engine()
    config.get_settings.cache_clear()


@pytest.fixture
def engine(db_url: str) -> Engine:
    """The process engine on a fresh database, with the system entities seeded."""
    engine = db.get_engine()
    with db.session_scope(engine) as session:
        ensure_system_entities(session)
    return engine


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session on the fresh database; the test commits what it needs."""
    with Session(engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def smtp_server() -> Iterator[SMTPSink]:
    """A real aiosmtpd server on a free loopback port, recording what it receives.

    Put lower-cased addresses in ``smtp_server.bounce`` (answered 550) or
    ``smtp_server.defer`` (answered 451); point ``SEQUENCER_SMTP_URL`` at
    ``smtp_server.url`` to send through it.
    """
    with SMTPSink() as sink:
        yield sink
