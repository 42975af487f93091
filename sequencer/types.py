"""Typed property values: reading what users type or import, and showing it back.

Every value that enters Sequencer, whether typed in the dashboard, imported
from CSV or rendered from a template, goes through ``parse_value`` so that a
number stored as ``"9"`` compares as 9 and a date typed ``03/04/2026`` means
the 3rd of April. Records keep the JSON form returned by ``to_json``.
"""

from __future__ import annotations

import json
import math
import re
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from email_validator import EmailNotValidError, validate_email

from sequencer.config import get_settings
from sequencer.enums import PropertyType
from sequencer.exceptions import ValidationError
from sequencer.timeutil import as_utc

TRUE_WORDS = {"true", "yes", "y", "1", "oui", "o", "vrai", "x", "on"}
FALSE_WORDS = {"false", "no", "n", "0", "non", "faux", "off"}

_ISO_DATE = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$")
_NUMERIC_DATE = re.compile(r"^(\d{1,2})[/.-](\d{1,2})[/.-](\d{2}|\d{4})$")
_TIME = re.compile(r"^(\d{1,2})[:hH](\d{2})(?::(\d{2}))?$")
_OFFSET = re.compile(r"^([+-])\s*(\d+)\s*([mhdw])$", re.IGNORECASE)
_BASE_AND_OFFSET = re.compile(r"^(.*\S)\s+([+-]\s*\d+\s*[mhdw])$", re.IGNORECASE)
_INTEGER_TEXT = re.compile(r"^[+-]?\d+$")
_TIME_PART = re.compile(
    r"^\d{1,2}[:hH]\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:Z|[+-]\d{2}:?\d{2})?$"
)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def is_empty(value: Any) -> bool:
    """True for None, blank text and empty lists: what ``is empty`` tests."""
    if value is None:
        return True
    kind = value.__class__
    if kind is int or kind is bool:
        return False
    if kind is float:
        return value != value  # NaN: an empty cell in a pandas table
    if kind is str:
        return not value or value.isspace()
    if kind.__name__ in ("NAType", "NaTType"):
        return True
    if isinstance(value, list | tuple | set | dict):
        return len(value) == 0
    return False


def parse_value(
    type: PropertyType,
    raw: Any,
    *,
    subject: str,
    field: str,
    timezone: str | None = None,
    dayfirst: bool | None = True,
    now: datetime | None = None,
) -> Any:
    """Read ``raw`` as a value of ``type``; empty input gives None (or ``[]``).

    :param dayfirst: how to read ``03/04/2026``: True is day first (the French
        habit), False month first, None refuses a date that could be either.
    :param now: the instant ``now`` and offsets such as ``+2h`` are counted
        from, for date-time values.
    :raises ValidationError: naming ``subject`` and ``field`` when the value
        cannot be read as the type.
    """
    type = PropertyType(type)
    if is_empty(raw):
        return [] if type is PropertyType.LIST else None
    try:
        return _PARSERS[type](raw, timezone, dayfirst, now)
    except ValueError as exc:
        raise ValidationError(subject, field, str(exc)) from None
    except OverflowError:
        raise ValidationError(
            subject, field, f"value {_text(raw)!r} is out of range"
        ) from None


def _text(raw: Any, *_: Any) -> str:
    if isinstance(raw, datetime | date):
        return raw.isoformat()
    if isinstance(raw, list | dict):
        return json.dumps(raw, ensure_ascii=False)
    return str(raw)


def _number(raw: Any, *_: Any) -> int | float:
    if isinstance(raw, bool):
        raise ValueError(f"value {raw!r} is not a number")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ValueError(f"value {raw!r} is not a number")
        return int(raw) if raw.is_integer() else raw
    text = str(raw).strip().replace("\u00a0", "").replace("\u202f", "")
    text = text.replace(" ", "").replace("'", "")
    if "_" in text:
        # float() reads "12_5" as 125: no spreadsheet writes numbers that way.
        raise ValueError(f"value {str(raw)!r} is not a number")
    if _INTEGER_TEXT.match(text):
        # Exactly, without a detour through float and its 53 bits.
        return int(text)
    if "," in text and "." in text:
        # The last separator is the decimal one: 1.234,5 or 1,234.5.
        thousands = "." if text.rfind(",") > text.rfind(".") else ","
        text = text.replace(thousands, "")
    text = text.replace(",", ".")
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"value {str(raw)!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"value {str(raw)!r} is not a number")
    return int(number) if number.is_integer() and "e" not in text.lower() else number


def _integer(raw: Any, *_: Any) -> int:
    try:
        number = _number(raw)
    except ValueError:
        raise ValueError(f"value {str(raw)!r} is not a whole number") from None
    if isinstance(number, float) and not number.is_integer():
        raise ValueError(f"value {str(raw)!r} is not a whole number")
    return int(number)


def _boolean(raw: Any, *_: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int | float) and raw in (0, 1):
        return bool(raw)
    word = str(raw).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"value {str(raw)!r} is not yes or no")


def _date(raw: Any, _tz: Any, dayfirst: bool | None, _now: Any) -> date:
    if isinstance(raw, datetime):
        return raw.date()
    if isinstance(raw, date):
        return raw
    text = str(raw).strip()
    if match := _BASE_AND_OFFSET.match(text):
        offset = _OFFSET.match(match.group(2).replace(" ", ""))
        if offset is not None:
            base = _date(match.group(1), _tz, dayfirst, _now)
            moment = datetime(base.year, base.month, base.day) + _offset(offset)
            return moment.date()
    # A date-time written where a date is expected keeps its date part.
    head, *rest = re.split(r"[T ]", text, maxsplit=1)
    if rest and not _TIME_PART.match(rest[0].strip()):
        raise ValueError(f"value {text!r} is not a date (use 31/12/2026 or 2026-12-31)")
    if match := _ISO_DATE.match(head):
        year, month, day = (int(part) for part in match.groups())
        return _checked_date(text, year, month, day)
    if match := _NUMERIC_DATE.match(head):
        return _numeric_date(text, *match.groups(), dayfirst=dayfirst)
    raise ValueError(f"value {text!r} is not a date (use 31/12/2026 or 2026-12-31)")


def _numeric_date(
    text: str, first: str, second: str, year: str, *, dayfirst: bool | None
) -> date:
    a, b, full_year = int(first), int(second), int(year)
    if len(year) == 2:
        full_year += 2000
    if dayfirst is None and a <= 12 and b <= 12 and a != b:
        raise ValueError(
            f"value {text!r} is ambiguous: day first or month first? "
            "write it 2026-12-31"
        )
    if dayfirst is False or (dayfirst is None and b > 12):
        a, b = b, a
    return _checked_date(text, full_year, b, a)


def _checked_date(text: str, year: int, month: int, day: int) -> date:
    try:
        return date(year, month, day)
    except ValueError:
        raise ValueError(f"value {text!r} is not a valid date") from None


def _datetime(
    raw: Any, timezone: str | None, dayfirst: bool | None, now: datetime | None
) -> datetime:
    zone = ZoneInfo(timezone or get_settings().timezone)
    if isinstance(raw, datetime):
        return as_utc(raw if raw.tzinfo else raw.replace(tzinfo=zone))
    if isinstance(raw, date):
        return as_utc(datetime(raw.year, raw.month, raw.day, tzinfo=zone))
    text = str(raw).strip()
    lowered = text.lower()
    if lowered == "now":
        return as_utc(now) if now else as_utc(datetime.now(zone))
    if match := _OFFSET.match(text):
        start = as_utc(now) if now else as_utc(datetime.now(zone))
        return _shift(start, match, zone)
    if match := _BASE_AND_OFFSET.match(text):
        base = _datetime(match.group(1), timezone, dayfirst, now)
        offset = _OFFSET.match(match.group(2).replace(" ", ""))
        if offset is not None:
            return _shift(base, offset, zone)
    return as_utc(_absolute(text, zone, dayfirst))


def _shift(moment: datetime, match: re.Match[str], zone: ZoneInfo) -> datetime:
    """``moment`` moved by an offset: days and weeks keep the wall-clock time.

    ``{created_at} +1d`` from 09:00 on the eve of a change of clocks means
    09:00 the next day in the users' zone, not 24 hours later (08:00 or
    10:00); minutes and hours are exact durations.
    """
    if match.group(3).lower() in ("d", "w"):
        wall = as_utc(moment).astimezone(zone).replace(tzinfo=None) + _offset(match)
        return as_utc(wall.replace(tzinfo=zone))
    return as_utc(moment) + _offset(match)


def _offset(match: re.Match[str]) -> timedelta:
    """``+30m``, ``+2h``, ``-3d`` or ``+1w`` as a duration."""
    sign, amount, unit = match.groups()
    delta = timedelta(**{_UNITS[unit.lower()]: int(amount)})
    return -delta if sign == "-" else delta


def _absolute(text: str, zone: ZoneInfo, dayfirst: bool | None) -> datetime:
    """A written date-time: ISO 8601 with or without offset, or ``31/12/2026 10:00``."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is not None:
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=zone)
    parts = text.split()
    if len(parts) > 2:
        raise ValueError(f"value {text!r} is not a date and time")
    day = _date(parts[0], None, dayfirst, None)
    hour = minute = second = 0
    if len(parts) == 2:
        match = _TIME.match(parts[1])
        if not match:
            raise ValueError(f"value {text!r} is not a date and time")
        hour, minute = int(match.group(1)), int(match.group(2))
        second = int(match.group(3) or 0)
    try:
        return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=zone)
    except ValueError:
        raise ValueError(f"value {text!r} is not a valid date and time") from None


def _email(raw: Any, *_: Any) -> str:
    """A checked address, lower-cased; its mailbox part must be ASCII.

    A non-ASCII mailbox (``josé@...``) needs SMTPUTF8, which Sequencer does
    not send with: refused when typed rather than when the emailing goes.
    """
    text = str(raw).strip()
    try:
        result = validate_email(text, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(f"value {text!r} is not an email address: {exc}") from None
    if "=?" in result.local_part:
        # Valid, but mail readers may decode it as an RFC 2047 word and show
        # other addresses in its place.
        raise ValueError(f"value {text!r}: its mailbox part reads as an encoded word")
    return result.normalized.lower()


def _list(raw: Any, *_: Any) -> list[Any]:
    if isinstance(raw, list | tuple | set):
        items = list(raw)
    else:
        text = str(raw).strip()
        if text.startswith("["):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError:
                loaded = list(text.strip("[]").split(","))
            items = loaded if isinstance(loaded, list) else [loaded]
        else:
            items = re.split(r"[,;]", text)
    result = []
    for item in items:
        if isinstance(item, str):
            item = item.strip().strip("'\"").strip()
            if item == "":
                continue
            if _INTEGER_TEXT.match(item):
                item = int(item)
        result.append(item)
    return result


_PARSERS = {
    PropertyType.TEXT: _text,
    PropertyType.NUMBER: _number,
    PropertyType.INTEGER: _integer,
    PropertyType.BOOLEAN: _boolean,
    PropertyType.DATE: _date,
    PropertyType.DATETIME: _datetime,
    PropertyType.EMAIL: _email,
    PropertyType.LIST: _list,
}


def to_json(type: PropertyType | None, value: Any) -> Any:
    """The form a typed value is stored in a JSON column and an event.

    The form depends on the value alone (dates as ISO text, times in UTC), so
    ``type`` is accepted for symmetry with ``from_json`` and may be None.
    """
    kind = value.__class__
    if value is None or kind is str or kind is int or kind is float or kind is bool:
        return value
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def from_json(type: PropertyType, stored: Any) -> Any:
    """The typed value of something stored by ``to_json`` (lenient on old data)."""
    if stored is None:
        return [] if type is PropertyType.LIST else None
    # Values written by ``to_json`` are already typed: skip the parser.
    kind = stored.__class__
    if kind is str and type is PropertyType.TEXT:
        return stored
    if (kind is int or kind is float) and type is PropertyType.NUMBER:
        return stored
    if kind is int and type is PropertyType.INTEGER:
        return stored
    if kind is bool and type is PropertyType.BOOLEAN:
        return stored
    if kind is str and type is PropertyType.DATETIME:
        try:
            moment = datetime.fromisoformat(stored)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return as_utc(moment)
    try:
        return parse_value(type, stored, subject="stored value", field=str(type))
    except ValidationError:
        return stored


def format_value(
    type: PropertyType | None, value: Any, *, timezone: str | None = None
) -> str:
    """A value as text in a template: ``12`` not ``12.0``, times in the user's zone."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        # float() first: a numpy float from a DataFrame reprs as np.float64(...).
        return str(int(value)) if value.is_integer() else repr(float(value))
    if isinstance(value, datetime):
        local = as_utc(value).astimezone(ZoneInfo(timezone or get_settings().timezone))
        pattern = "%Y-%m-%d %H:%M" if local.second == 0 else "%Y-%m-%d %H:%M:%S"
        return local.strftime(pattern)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return ", ".join(format_value(None, item, timezone=timezone) for item in value)
    return str(value)


def values_equal(type: PropertyType, left: Any, right: Any) -> bool:
    """Whether two typed values are the same; an update between them is no change."""
    if left == right:
        return True
    if is_empty(left) and is_empty(right):
        return True
    if type is PropertyType.EMAIL and isinstance(left, str) and isinstance(right, str):
        return left.lower() == right.lower()
    return False
