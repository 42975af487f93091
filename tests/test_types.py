"""Reading typed values from what users type, import or render."""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pytest

from sequencer.enums import PropertyType as T
from sequencer.exceptions import ValidationError
from sequencer.types import format_value, from_json, parse_value, to_json

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def read(kind: T, raw: object, **options: object) -> object:
    return parse_value(kind, raw, subject="produits", field="x", **options)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("9", 9), ("12,5", 12.5), ("1 234,50", 1234.5), ("1.234,5", 1234.5),
     ("1,234.5", 1234.5), (" 7 ", 7), (3.0, 3), ("-4", -4)],
)  # fmt: skip
def test_number_reads_local_spellings(raw: object, expected: float) -> None:
    assert read(T.NUMBER, raw) == expected


def test_number_refuses_text_naming_field_and_value() -> None:
    with pytest.raises(
        ValidationError, match="produits: x: value 'abc' is not a number"
    ):
        read(T.NUMBER, "abc")


def test_integer_refuses_a_fraction() -> None:
    with pytest.raises(ValidationError, match="not a whole number"):
        read(T.INTEGER, "2,5")


@pytest.mark.parametrize(("raw", "expected"), [("oui", True), ("Non", False),
                         ("1", True), ("false", False), (True, True)])  # fmt: skip
def test_boolean_reads_yes_and_no(raw: object, expected: bool) -> None:
    assert read(T.BOOLEAN, raw) is expected


def test_empty_input_reads_as_nothing() -> None:
    assert read(T.NUMBER, "  ") is None
    assert read(T.LIST, "") == []


def test_date_reads_day_first_by_default() -> None:
    assert read(T.DATE, "03/04/2026") == date(2026, 4, 3)
    assert read(T.DATE, "2026-04-03") == date(2026, 4, 3)


def test_date_reads_month_first_when_asked() -> None:
    assert read(T.DATE, "03/04/2026", dayfirst=False) == date(2026, 3, 4)


def test_ambiguous_date_is_refused_when_order_unknown() -> None:
    with pytest.raises(ValidationError, match="ambiguous"):
        read(T.DATE, "03/04/2026", dayfirst=None)
    assert read(T.DATE, "13/04/2026", dayfirst=None) == date(2026, 4, 13)


def test_impossible_date_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a valid date"):
        read(T.DATE, "31/02/2026")


def test_datetime_typed_in_user_zone_is_stored_in_utc() -> None:
    winter = read(T.DATETIME, "03/12/2026 10:00", timezone="Europe/Paris")
    summer = read(T.DATETIME, "2026-07-01 10:00", timezone="Europe/Paris")
    assert winter == datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    assert summer == datetime(2026, 7, 1, 8, 0, tzinfo=UTC)


def test_datetime_reads_now_and_offsets() -> None:
    assert read(T.DATETIME, "now", now=NOW) == NOW
    half_past = datetime(2026, 12, 3, 9, 30, tzinfo=UTC)
    assert read(T.DATETIME, "+30m", now=NOW) == half_past
    assert read(T.DATETIME, "+2h", now=NOW) == datetime(2026, 12, 3, 11, 0, tzinfo=UTC)
    assert read(T.DATETIME, "+3d", now=NOW) == datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


def test_datetime_reads_a_date_plus_offset() -> None:
    value = read(T.DATETIME, "2026-12-03 10:00 +1d", timezone="Europe/Paris")
    assert value == datetime(2026, 12, 4, 9, 0, tzinfo=UTC)


def test_email_is_lower_cased_and_validated() -> None:
    assert read(T.EMAIL, " Jean.Dupont@Example.COM ") == "jean.dupont@example.com"
    with pytest.raises(ValidationError, match="not an email address"):
        read(T.EMAIL, "jean@")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("josé@shop.example.com", "not supported"),
        ("=?utf-8?q?ceo=40bank.example?=@attacker.example", "encoded word"),
    ],
)
def test_email_that_cannot_be_sent_as_typed_is_refused(raw: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        read(T.EMAIL, raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("[3]", [3]), ("[3, 7]", [3, 7]), ("3, 7", [3, 7]),
     ("vip; achat", ["vip", "achat"]), ([1, "2"], [1, 2]),
     ("['a', 'b']", ["a", "b"])],
)  # fmt: skip
def test_list_reads_ids_and_words(raw: object, expected: list[object]) -> None:
    assert read(T.LIST, raw) == expected


def test_json_round_trip_keeps_types() -> None:
    moment = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    assert from_json(T.DATETIME, to_json(T.DATETIME, moment)) == moment
    assert from_json(T.DATE, to_json(T.DATE, date(2026, 1, 2))) == date(2026, 1, 2)
    assert from_json(T.NUMBER, "9") == 9


def test_format_shows_values_as_people_write_them() -> None:
    assert format_value(T.NUMBER, 12.0) == "12"
    assert format_value(T.NUMBER, 4.5) == "4.5"
    assert format_value(T.DATETIME, NOW, timezone="Europe/Paris") == "2026-12-03 10:00"
    assert format_value(T.LIST, [3, 7]) == "3, 7"
    assert format_value(T.TEXT, None) == ""


def test_empty_table_cells_read_as_nothing() -> None:
    assert read(T.NUMBER, float("nan")) is None
    assert read(T.DATE, pd.NaT) is None
    assert read(T.INTEGER, np.int64(5)) == 5


def test_number_refuses_underscores_python_would_accept() -> None:
    with pytest.raises(ValidationError, match="value '12_5' is not a number"):
        read(T.NUMBER, "12_5")


def test_integer_beyond_float_precision_is_read_exactly() -> None:
    assert read(T.INTEGER, "99999999999999999999999") == 99999999999999999999999


@pytest.mark.parametrize(
    ("kind", "raw"),
    [(T.DATETIME, "+99999999d"), (T.DATETIME, "9999-12-31T23:59-05:00"),
     (T.DATETIME, "+9999999999999999999999w"), (T.DATE, "31/12/9999 +1d")],
)  # fmt: skip
def test_out_of_range_moment_is_a_validation_error(kind: T, raw: str) -> None:
    with pytest.raises(ValidationError, match=r"produits: x: value .* out of range"):
        read(kind, raw, now=NOW)


def test_date_applies_an_offset_instead_of_dropping_it() -> None:
    assert read(T.DATE, "2026-02-01 +1d") == date(2026, 2, 2)
    assert read(T.DATE, "31/01/2026 +2w") == date(2026, 2, 14)


@pytest.mark.parametrize("raw", ["2026-02-01 +3x", "2026-02-01 foo", "01/02/2026 !"])
def test_date_with_trailing_text_is_refused(raw: str) -> None:
    with pytest.raises(ValidationError, match="is not a date"):
        read(T.DATE, raw)


def test_day_offsets_keep_the_wall_clock_time_across_a_change_of_clocks() -> None:
    before_autumn = datetime(2026, 10, 24, 7, 0, tzinfo=UTC)  # 09:00 in Paris
    assert read(T.DATETIME, "+1d", now=before_autumn, timezone="Europe/Paris") == (
        datetime(2026, 10, 25, 8, 0, tzinfo=UTC)  # 09:00 in Paris, winter time
    )
    assert read(T.DATETIME, "24/10/2026 09:00 +1w", timezone="Europe/Paris") == (
        datetime(2026, 10, 31, 8, 0, tzinfo=UTC)
    )
    assert read(T.DATETIME, "+24h", now=before_autumn) == datetime(
        2026, 10, 25, 7, 0, tzinfo=UTC
    )


def test_day_offset_landing_in_the_spring_gap_moves_forward() -> None:
    value = read(T.DATETIME, "28/03/2026 02:30 +1d", timezone="Europe/Paris")
    assert value == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 03:30 summer time


def test_format_value_of_a_numpy_float_reads_as_a_plain_number() -> None:
    value = np.float64(31347.75)

    assert format_value(T.NUMBER, value) == "31347.75"
