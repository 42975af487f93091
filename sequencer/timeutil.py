"""Time handling: everything is stored in UTC and shown in the user's zone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.engine import Dialect
from sqlalchemy.types import DateTime, TypeDecorator


def utcnow() -> datetime:
    """The current instant, time-zone aware, in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Read a naive datetime as UTC and convert an aware one to UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def to_zone(value: datetime | None, zone: str) -> datetime | None:
    """Convert a stored UTC instant to the given IANA time zone for display."""
    if value is None:
        return None
    return as_utc(value).astimezone(ZoneInfo(zone))


class UTCDateTime(TypeDecorator[datetime]):
    """A column that stores naive UTC and always hands back aware UTC.

    SQLite has no time zone type and PostgreSQL's ``timestamptz`` converts to the
    session zone; storing naive UTC behaves the same on both.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {value!r}")
        return as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)
