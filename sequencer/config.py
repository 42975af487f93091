"""Configuration, read from environment variables once per process.

Every variable has a default that runs the embedded setup: SQLite and an
outbox folder under ``data/``, the dashboard on localhost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The project folder, which holds ``app.py``, ``pages/`` and ``data/``."""

DATA_DIR = ROOT / "data"


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    """The active configuration. See README.md for each variable."""

    database_url: str = f"sqlite:///{DATA_DIR / 'sequencer.db'}"
    smtp_url: str | None = None
    """``smtp://user:pass@host:port?starttls=1`` or ``smtps://...``; None: outbox."""
    outbox_dir: Path = DATA_DIR / "outbox"
    public_url: str = "http://localhost:8501"
    """Base of tracking and unsubscribe links, as recipients reach it."""
    secret_key: str | None = None
    """Signs tracking tokens; generated and stored in the database when unset."""
    timezone: str = "Europe/Paris"
    """The users' time zone: dates are typed and shown in it."""
    tracking_port: int = 8502
    """Port of the tracking routes served by the headless ``worker``."""
    smtp_connections: int = 4
    smtp_rate: float = 0.0
    """Maximum messages per second over all connections; 0 for no limit."""
    smtp_timeout: float = 30.0
    batch_size: int = 100
    """Recipients claimed at once by one sending connection.

    A claim is the costliest statement of a send; at a few hundred messages
    a second per connection, a batch still lasts a fraction of a second, so
    a cancel or a second worker takes effect as quickly.
    """
    max_attempts: int = 5
    """Temporary failures of one delivery before it is marked failed."""
    tick_seconds: float = 2.0
    stale_claim_seconds: float = 300.0
    """A claim older than this belongs to a dead worker and is taken over."""
    worker_id: str = field(
        default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}"
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the environment once; tests call ``get_settings.cache_clear()``."""
    env = os.environ.get
    defaults = Settings()
    return Settings(
        database_url=env("SEQUENCER_DATABASE_URL") or defaults.database_url,
        smtp_url=env("SEQUENCER_SMTP_URL") or None,
        outbox_dir=Path(env("SEQUENCER_OUTBOX_DIR") or defaults.outbox_dir),
        public_url=(env("SEQUENCER_PUBLIC_URL") or defaults.public_url).rstrip("/"),
        secret_key=env("SEQUENCER_SECRET_KEY") or None,
        timezone=env("SEQUENCER_TIMEZONE") or defaults.timezone,
        tracking_port=_int("SEQUENCER_TRACKING_PORT", defaults.tracking_port),
        smtp_connections=_int("SEQUENCER_SMTP_CONNECTIONS", defaults.smtp_connections),
        smtp_rate=_float("SEQUENCER_SMTP_RATE", defaults.smtp_rate),
        smtp_timeout=_float("SEQUENCER_SMTP_TIMEOUT", defaults.smtp_timeout),
        batch_size=_int("SEQUENCER_BATCH_SIZE", defaults.batch_size),
        max_attempts=_int("SEQUENCER_MAX_ATTEMPTS", defaults.max_attempts),
        tick_seconds=_float("SEQUENCER_TICK_SECONDS", defaults.tick_seconds),
        stale_claim_seconds=_float(
            "SEQUENCER_STALE_CLAIM_SECONDS", defaults.stale_claim_seconds
        ),
        worker_id=env("SEQUENCER_WORKER_ID") or defaults.worker_id,
    )
