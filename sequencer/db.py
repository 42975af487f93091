"""Database engine and sessions, the same code on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import make_url
from sqlmodel import Session, SQLModel, create_engine

from sequencer import models  # noqa: F401  (registers every table)
from sequencer.config import ROOT, get_settings

logger = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers run during a send; foreign keys are off by default."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Build an engine for ``url``, creating the SQLite folder if needed."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg"))
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    """The process's engine for ``SEQUENCER_DATABASE_URL``."""
    return make_engine(get_settings().database_url)


def reset_engine() -> None:
    """Forget the cached engine (tests switch databases between runs)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine or get_engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def is_postgres(session_or_engine: Session | Engine) -> bool:
    """True on PostgreSQL, where claims use ``FOR UPDATE SKIP LOCKED``."""
    bind = (
        session_or_engine.get_bind()
        if isinstance(session_or_engine, Session)
        else session_or_engine
    )
    return bind.dialect.name == "postgresql"


def create_schema(engine: Engine) -> None:
    """Create every table from the models (tests; production uses ``init_db``)."""
    SQLModel.metadata.create_all(engine)


def alembic_config(url: str) -> Any:
    """The Alembic configuration for ``migrations/``, pointed at ``url``."""
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def init_db(engine: Engine | None = None) -> None:
    """Create or migrate the database to the newest schema, then seed it."""
    from alembic import command

    from sequencer.system import ensure_system_entities

    engine = engine or get_engine()
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    with session_scope(engine) as session:
        ensure_system_entities(session)
    logger.info("database at %s is at the newest schema", engine.url)


def insert_ignoring_conflicts(
    connection: Connection | Session,
    model: type[SQLModel],
    values: dict[str, Any],
    *,
    conflict_columns: list[str],
) -> bool:
    """Insert one row unless one with the same unique key exists.

    ``INSERT ... ON CONFLICT DO NOTHING`` on both backends: two processes
    inserting the same key at once both succeed and one row remains. Returns
    True when this call inserted the row.
    """
    statement = (
        insert_for(connection, model)
        .values(**values)
        .on_conflict_do_nothing(index_elements=conflict_columns)
    )
    result = connection.execute(statement)
    return bool(result.rowcount)


def insert_for(connection: Connection | Session, model: type[SQLModel]) -> Any:
    """The backend's own ``INSERT`` into ``model``, which knows ``ON CONFLICT``."""
    table = model.__table__  # type: ignore[attr-defined]
    bind = connection if isinstance(connection, Connection) else connection.get_bind()
    if bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)
