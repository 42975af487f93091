"""CSV import of records and contacts, each row firing sequences like any write.

Files come from spreadsheets in every local flavour: UTF-8 with or without a
byte-order mark or Latin-1, comma or semicolon separated, decimal commas, dates
written day first. The file is read with the standard ``csv`` module; its
encoding and separator are detected, each date column is checked to be read
one way only (never a silent mix of day-first and month-first), and a bad row
is reported with its row number and reason without stopping the good ones.

Rows are written in chunks: each row and its event still commit together, the
sequences of a chunk run right after its commit, and the registry and the
active sequences are read once per import.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from sequencer import adapters, engine, records
from sequencer.db import session_scope
from sequencer.entities import EntityInfo, describe
from sequencer.enums import EventStatus, PropertyType, RunOutcome
from sequencer.exceptions import ImportFileError, NotFoundError, ValidationError
from sequencer.models import Contact, Record
from sequencer.records import PendingWrite
from sequencer.system import CONTACT, SENDER
from sequencer.timeutil import as_utc, utcnow
from sequencer.types import is_empty, parse_value, to_json

logger = logging.getLogger(__name__)

CHUNK = 500
"""Rows committed together; each row still commits with its own event."""
_NUMERIC_DATE = re.compile(r"^\s*(\d{1,2})[/.-](\d{1,2})[/.-](\d{2}|\d{4})\b")


@dataclass
class ImportReport:
    """What an import did, row by row where it matters."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """``(row number, reason)``; row 1 is the header, the first record is row 2."""
    sequences_run: int = 0
    sequence_errors: int = 0
    warnings: list[str] = field(default_factory=list)
    encoding: str = ""
    delimiter: str = ""

    def summary(self) -> str:
        """One line: ``created 3, updated 2, unchanged 1, rejected 1, ...``."""
        line = (
            f"created {self.created}, updated {self.updated}, "
            f"unchanged {self.unchanged}, rejected {len(self.rejected)}, "
            f"sequences run {self.sequences_run}"
        )
        if self.sequence_errors:
            line += f" ({self.sequence_errors} sequence errors in the run log)"
        return line


@dataclass
class CsvFile:
    """A decoded CSV file: header, rows with their row numbers, how it was read."""

    header: list[str]
    rows: list[tuple[int, list[str]]]
    encoding: str
    delimiter: str


@dataclass
class Column:
    """What a file column feeds: a property, the key, or nothing."""

    header: str
    target: str | None
    """Property name, ``id``, ``reference``, a contact attribute, or None."""
    type: PropertyType | None
    dayfirst: bool | None = True

    def describe(self) -> str:
        if self.target is None:
            return "ignored"
        kind = self.type.value if self.type else "text"
        return f"{self.target} ({kind})"


@dataclass
class Preview:
    """The first rows as written, with the type each column will be read as."""

    frame: pd.DataFrame
    types: dict[str, str]
    encoding: str
    delimiter: str
    warnings: list[str]


def _decode(data: bytes) -> tuple[str, str]:
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8"), "utf-8 (BOM)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # Excel's "Unicode text" and some exports write UTF-16 with its BOM.
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            raise ImportFileError(
                "the file starts like UTF-16 but is not valid UTF-16"
            ) from None
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "latin-1 (windows-1252)"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def read_file(file: bytes | str | Path) -> CsvFile:
    """Decode and split a CSV file, detecting its encoding and separator.

    :raises ImportFileError: for an empty file or one without a header.
    """
    data = Path(file).read_bytes() if isinstance(file, str | Path) else bytes(file)
    text, encoding = _decode(data)
    first_line = text.lstrip("\r\n").split("\n", 1)[0]
    if not first_line.strip():
        raise ImportFileError("the file is empty: a header row is required")
    delimiter = max(
        [",", ";", "\t"],
        key=lambda sep: len(next(csv.reader([first_line], delimiter=sep))),
    )
    # The lines as the csv module reads them, so that a record's first line is
    # known: a quote left open runs to the end of the file, which the lenient
    # reader would silently turn into one huge cell.
    lines = list(io.StringIO(text, newline=""))
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        reader = csv.reader(lines, delimiter=delimiter)
        header = [cell.strip() for cell in next(reader)]
        if not any(header):
            raise ImportFileError("the header row is empty")
        rows = []
        number, start, last_start = 1, reader.line_num, reader.line_num
        for cells in reader:
            # Row numbers count records as a spreadsheet shows them: a cell
            # with line breaks is still one row.
            number += 1
            last_start, start = start, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            rows.append((number, cells))
        # The lenient reader runs an unclosed quote to the end of the file, so
        # only the last record can have swallowed the rows after it.
        if number > 1:
            _check_closed(lines, last_start, delimiter, number)
    finally:
        csv.field_size_limit(limit)
    return CsvFile(header, rows, encoding, delimiter)


def _check_closed(lines: list[str], start: int, delimiter: str, number: int) -> None:
    """Refuse a record whose quote is never closed (it ran to the end of file)."""
    if start >= len(lines) - 1 or '"' not in lines[start]:
        return
    strict = csv.reader(lines[start:], delimiter=delimiter, strict=True)
    try:
        next(strict)
    except csv.Error as exc:
        if "unexpected end of data" not in str(exc):
            return
        raise ImportFileError(
            f'row {number}: a quote (") opened in this row is never closed, so '
            "every line after it would be read as one cell; close the quote or "
            "remove it"
        ) from None
    except StopIteration:
        return


def _normal(text: str) -> str:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", plain.lower()).strip("_")


def _map_columns(
    info: EntityInfo, header: list[str], warnings: list[str]
) -> list[Column]:
    # A header written exactly as a property's name or label wins over a loose
    # match, and a loose match on a name over one on a label: a property
    # labelled "Référence" must not take the column "reference".
    exact: dict[str, str] = {}
    by_name: dict[str, str] = {}
    for name, prop in info.properties.items():
        exact.setdefault(prop.label.strip(), name)
        by_name.setdefault(_normal(prop.label), name)
    for name in info.properties:
        exact[name] = name
        by_name[_normal(name)] = name
    for reserved in ("id", "reference"):
        if reserved not in exact:
            by_name.pop(reserved, None)
    has_reference = adapters.adapter_for(info).has_reference
    columns = []
    seen: set[str] = set()
    for cell in header:
        normal = _normal(cell)
        target: str | None = exact.get(cell.strip()) or by_name.get(normal)
        kind = info.properties[target].type if target else None
        if target is None and normal == "id":
            target, kind = "id", PropertyType.INTEGER
        elif target is None and normal == "reference" and has_reference:
            target, kind = "reference", PropertyType.TEXT
        elif target is None and info.name == CONTACT and normal:
            target, kind = normal, PropertyType.TEXT
        repeated = target is not None and target in seen
        if repeated:
            warnings.append(f"column '{cell}' repeats '{target}' and is ignored")
            target = None
        if target is None:
            if normal and not repeated:
                warnings.append(f"column '{cell}' is not a property of {info.name}")
        else:
            seen.add(target)
        columns.append(Column(cell, target, kind))
    return columns


def _date_order(column: Column, index: int, rows: list[tuple[int, list[str]]]) -> None:
    """Decide how the column's dates read; refuse a mix of both orders."""
    day_first = month_first = None
    for number, cells in rows:
        if index >= len(cells):
            continue
        match = _NUMERIC_DATE.match(cells[index])
        if not match:
            continue
        first, second = int(match.group(1)), int(match.group(2))
        if first > 12 and day_first is None:
            day_first = (number, cells[index].strip())
        if second > 12 and month_first is None:
            month_first = (number, cells[index].strip())
    if day_first and month_first:
        raise ImportFileError(
            f"column '{column.header}' mixes day-first dates (row {day_first[0]}: "
            f"{day_first[1]}) and month-first dates (row {month_first[0]}: "
            f"{month_first[1]}); write the dates as 2026-12-31"
        )
    column.dayfirst = False if month_first else True


def _prepare_columns(
    info: EntityInfo, csv_file: CsvFile, warnings: list[str]
) -> list[Column]:
    columns = _map_columns(info, csv_file.header, warnings)
    for index, column in enumerate(columns):
        if column.type in (PropertyType.DATE, PropertyType.DATETIME):
            _date_order(column, index, csv_file.rows)
            if column.dayfirst is False:
                warnings.append(f"column '{column.header}' has dates read month first")
    return columns


def preview_csv(
    file: bytes | str | Path,
    entity: Any,
    rows: int = 5,
    *,
    session: Session | None = None,
) -> Preview:
    """The first rows of a file and how each column will be read."""
    csv_file = read_file(file)
    warnings: list[str] = []
    if session is None:
        with session_scope() as own:
            columns = _prepare_columns(describe(own, entity), csv_file, warnings)
    else:
        columns = _prepare_columns(describe(session, entity), csv_file, warnings)
    width = len(csv_file.header)
    data = [
        (cells + [""] * width)[:width] for _, cells in csv_file.rows[: max(rows, 0)]
    ]
    headers = _unique_headers(csv_file.header)
    frame = pd.DataFrame(data, columns=headers)
    types = {
        header: column.describe()
        for header, column in zip(headers, columns, strict=True)
    }
    return Preview(frame, types, csv_file.encoding, csv_file.delimiter, warnings)


def _unique_headers(header: list[str]) -> list[str]:
    result: list[str] = []
    for cell in header:
        name, number = cell or "column", 2
        while name in result:
            name, number = f"{cell} ({number})", number + 1
        result.append(name)
    return result


class _Importer:
    """One import run: the key lookup, the chunked writes and their sequences."""

    def __init__(
        self,
        session: Session,
        info: EntityInfo,
        columns: list[Column],
        key: str | None,
        now: datetime,
        run_sequences: bool,
        report: ImportReport,
    ) -> None:
        self.session = session
        self.info = info
        self.columns = columns
        self.key = key
        self.now = now
        self.run_sequences = run_sequences
        self.report = report
        self.adapter = adapters.adapter_for(info)
        self.status_for = engine.event_status(session, claim=run_sequences)
        self.ambiguous: dict[Any, int] = {}
        """Key values that more than one stored record has, with their count."""

    def values(self, number: int, cells: list[str]) -> dict[str, Any]:
        if len(cells) > len(self.columns) and any(
            cell.strip() for cell in cells[len(self.columns) :]
        ):
            raise ValidationError(
                f"row {number}",
                None,
                f"{len(cells)} cells but the header has {len(self.columns)} columns",
            )
        values: dict[str, Any] = {}
        for column, cell in zip(self.columns, cells, strict=False):
            if column.target is None:
                continue
            text = cell.strip()
            if column.type in (PropertyType.DATE, PropertyType.DATETIME) and text:
                values[column.target] = parse_value(
                    column.type,
                    text,
                    subject=f"row {number}",
                    field=column.target,
                    dayfirst=column.dayfirst,
                    now=self.now,
                )
            else:
                values[column.target] = text
        return values

    def key_value(self, number: int, values: dict[str, Any]) -> Any:
        if self.key is None:
            return None
        raw = values.get(self.key)
        if is_empty(raw):
            return None
        kind = (
            PropertyType.INTEGER
            if self.key == "id"
            else self.info.properties[self.key].type
        )
        value = parse_value(kind, raw, subject=f"row {number}", field=self.key)
        return to_json(kind, value)

    def existing(self, keys: list[Any]) -> dict[Any, Any]:
        """The stored rows whose key is among ``keys``, by key value."""
        if self.key is None or not keys:
            return {}
        model = self.adapter.model
        if self.key == "id":
            query = select(model).where(model.id.in_(keys))
            if model is Record:
                query = query.where(Record.entity_id == self.info.id)
            return {row.id: row for row in self.session.scalars(query)}
        if model is Contact and self.key == "email":
            query = select(Contact).where(func.lower(Contact.email).in_(keys))
            return {row.email.lower(): row for row in self.session.scalars(query)}
        if model is Record:
            kind = self.info.properties[self.key].type
            element = Record.data[self.key]
            if kind is PropertyType.INTEGER:
                expression = element.as_integer()
            elif kind is PropertyType.NUMBER:
                expression = element.as_float()
            elif kind is PropertyType.BOOLEAN:
                expression = element.as_boolean()
            else:
                expression = element.as_string()
            query = select(Record).where(
                Record.entity_id == self.info.id, expression.in_(keys)
            )
            found: dict[Any, Any] = {}
            for row in self.session.scalars(query):
                stored = self._stored_key(row)
                if stored in found:
                    self.ambiguous[stored] = self.ambiguous.get(stored, 1) + 1
                found[stored] = row
            return found
        column = getattr(model, self.key)
        query = select(model).where(column.in_(keys))
        found = {}
        for row in self.session.scalars(query):
            if getattr(row, self.key) in found:
                stored = getattr(row, self.key)
                self.ambiguous[stored] = self.ambiguous.get(stored, 1) + 1
            found[getattr(row, self.key)] = row
        return found

    def _stored_key(self, row: Record) -> Any:
        kind = self.info.properties[self.key].type
        value = parse_value(kind, row.data.get(self.key), subject="", field="")
        return to_json(kind, value)

    def run(
        self,
        rows: list[tuple[int, list[str]]],
        progress: Callable[[int, int], None] | None,
    ) -> None:
        total, done, start = len(rows), 0, 0
        while start < total:
            chunk = rows[start : start + CHUNK]
            taken = self.chunk(chunk)
            start += taken
            done += taken
            if progress is not None:
                progress(done, total)

    def chunk(self, rows: list[tuple[int, list[str]]]) -> int:
        """Write up to a chunk of rows; stops early before a repeated key."""
        parsed: list[tuple[int, dict[str, Any], Any]] = []
        for number, cells in rows:
            try:
                values = self.values(number, cells)
                parsed.append((number, values, self.key_value(number, values)))
            except ValidationError as exc:
                parsed.append((number, {}, exc))
        found = self.existing(
            [
                key
                for _, _, key in parsed
                if key is not None and not isinstance(key, Exception)
            ]
        )
        writes: list[PendingWrite] = []
        outcomes: list[tuple[int, str]] = []
        seen: set[Any] = set()
        taken = 0
        for number, values, key in parsed:
            if key is not None and not isinstance(key, Exception):
                if key in seen:
                    break  # the earlier row must be stored before this one reads it
                seen.add(key)
            taken += 1
            if isinstance(key, Exception):
                self.report.rejected.append((number, str(key)))
                continue
            if key in self.ambiguous:
                self.report.rejected.append(
                    (
                        number,
                        f"{self.info.name}: {self.key}: {key!r} matches "
                        f"{self.ambiguous[key]} records; the key column must "
                        "name one record",
                    )
                )
                continue
            try:
                write = self.write(values, key, found.get(key))
            except (ValidationError, NotFoundError) as exc:
                self.report.rejected.append((number, str(exc)))
                continue
            if write is None:
                outcomes.append((number, "unchanged"))
                continue
            writes.append(write)
            outcomes.append((number, write.action.value))
        try:
            events = records.finish_writes(
                self.session, writes, now=self.now, status_for=self.status_for
            )
            self.session.commit()
        except DBAPIError as exc:
            self.session.rollback()
            if taken == 1:
                reason = f"the database refused the row: {exc.orig}"
                self.report.rejected.append((rows[0][0], reason))
                return 1
            for row in rows[:taken]:
                self.chunk([row])
            return taken
        self.count(outcomes)
        claimed = [event for event in events if event.status is EventStatus.PROCESSING]
        if self.run_sequences and claimed:
            for run in engine.run_events(
                self.session, claimed, now=self.now, collect=False
            ):
                if run.outcome is RunOutcome.DONE:
                    self.report.sequences_run += 1
                elif run.outcome is RunOutcome.ERROR:
                    self.report.sequence_errors += 1
        return taken

    def write(
        self, values: dict[str, Any], key: Any, row: Any | None
    ) -> PendingWrite | None:
        values.pop("id", None)
        if row is not None:
            return records.prepare_update(
                self.session, self.info, row, values, now=self.now
            )
        if self.key == "id" and key is not None:
            raise NotFoundError(f"{self.info.name} record", key)
        return records.prepare_create(self.session, self.info, values, now=self.now)

    def count(self, outcomes: list[tuple[int, str]]) -> None:
        for _, outcome in outcomes:
            if outcome == "create":
                self.report.created += 1
            elif outcome == "update":
                self.report.updated += 1
            else:
                self.report.unchanged += 1


def import_csv(
    session: Session,
    entity: Any,
    file: bytes | str | Path,
    *,
    key: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    now: datetime | None = None,
    run_sequences: bool = True,
) -> ImportReport:
    """Create or update an entity's records from a CSV file.

    :param key: the column that finds the record a row updates (a property
        name or header, or ``id``); by default ``email`` for contacts and
        senders, ``id`` when the file has such a column, otherwise every row
        is a new record.
    :raises ImportFileError: when the file as a whole cannot be read.
    """
    now = as_utc(now) if now else utcnow()
    info = describe(session, entity)
    csv_file = read_file(file)
    report = ImportReport(encoding=csv_file.encoding, delimiter=csv_file.delimiter)
    columns = _prepare_columns(info, csv_file, report.warnings)
    key_name = _key(info, columns, key)
    importer = _Importer(session, info, columns, key_name, now, run_sequences, report)
    importer.run(csv_file.rows, progress)
    report.rejected.sort()
    logger.info(
        "imported %s rows into %s: %s", len(csv_file.rows), info.name, report.summary()
    )
    return report


def _key(info: EntityInfo, columns: list[Column], key: str | None) -> str | None:
    targets = {column.target for column in columns if column.target}
    if key is None:
        if info.name in (CONTACT, SENDER) and "email" in targets:
            return "email"
        return "id" if "id" in targets else None
    wanted = key.strip()
    for column in columns:
        if column.target and wanted in (column.header, column.target):
            if column.target == "reference" or (
                column.target not in info.properties and column.target != "id"
            ):
                raise ImportFileError(f"key column '{key}' must be a property or id")
            return column.target
    raise ImportFileError(
        f"key column '{key}' is not in the file (columns: "
        f"{', '.join(column.header for column in columns)})"
    )
