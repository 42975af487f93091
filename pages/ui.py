"""Small helpers the pages share: sessions, times, messages and field errors.

Nothing here knows a business rule; it only turns domain results and errors
into Streamlit elements the same way on every page.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pandas as pd
import streamlit as st
from sqlmodel import Session

from sequencer.config import get_settings
from sequencer.db import session_scope
from sequencer.exceptions import SequencerError, ValidationError
from sequencer.timeutil import to_zone

FLASH_KEY = "_flash_messages"


@contextmanager
def session() -> Iterator[Session]:
    """A database session for one page action; commits when it succeeds."""
    with session_scope() as db_session:
        yield db_session


def zone() -> str:
    """The users' time zone, in which every time is typed and shown."""
    return get_settings().timezone


def local_time(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A stored UTC instant as text in the users' time zone; "" when unset."""
    if value is None or pd.isna(value):
        return ""
    return to_zone(pd.Timestamp(value).to_pydatetime(), zone()).strftime(fmt)


def localize(frame: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Convert the UTC datetime columns of ``frame`` to the users' zone.

    The result keeps real datetimes (so tables sort by time) but drops the
    zone suffix, which would only repeat the caption of the page.
    """
    frame = frame.copy()
    candidates = columns or [
        name
        for name in frame.columns
        if pd.api.types.is_datetime64_any_dtype(frame[name])
        or name.endswith("_at")
        or name in {"time", "last_run", "last_beat"}
    ]
    for name in candidates:
        if name not in frame.columns:
            continue
        values = pd.to_datetime(frame[name], utc=True, errors="coerce")
        frame[name] = values.dt.tz_convert(zone()).dt.tz_localize(None)
    return frame


def labels(frame: pd.DataFrame, **named: Any) -> dict[str, Any]:
    """Column headers a person reads: ``first_open_at`` shows as "First open at".

    ``named`` gives a column its own label or ``st.column_config`` entry.
    """
    config: dict[str, Any] = {
        name: str(name).replace("_", " ").capitalize() for name in frame.columns
    }
    config.update(named)
    return config


def zone_caption() -> None:
    """Say once per page in which zone the times are shown."""
    st.caption(f"Times are shown in {zone()}.")


# --- Messages ------------------------------------------------------------------


def flash(
    message: str, icon: str = ":material/check_circle:", duration: str = "short"
) -> None:
    """Queue a toast for the next run, so it survives ``st.rerun()``."""
    st.session_state.setdefault(FLASH_KEY, []).append((message, icon, duration))


def show_flash() -> None:
    """Show the toasts queued by the previous run (called by ``app.py``)."""
    for message, icon, duration in st.session_state.pop(FLASH_KEY, []):
        st.toast(message, icon=icon, duration=duration)


def run_action(
    action: Callable[[Session], Any],
    success: str | Callable[[Any], str],
    *,
    rerun: bool = True,
) -> Any:
    """Run one domain call in a session, then toast what it did.

    A ``SequencerError`` is shown as an error message and returns None; the
    caller decides where field errors go when it needs them next to a field.
    """
    try:
        with st.spinner("Working…"), session() as db_session:
            result = action(db_session)
    except SequencerError as exc:
        st.error(str(exc))
        return None
    flash(success(result) if callable(success) else success)
    if rerun:
        st.rerun()
    show_flash()
    return result


# --- Field errors --------------------------------------------------------------


def _normalise(field: str) -> str:
    """One spelling for a field name: ``Send at`` and ``send_at`` are the same."""
    return re.sub(r"[^a-z0-9]+", "_", field.lower()).strip("_")


class FieldErrors:
    """Errors keyed by field, shown under the widget they belong to.

    Domain errors name their field (``ValidationError.field``, such as
    ``trigger entity``, ``condition 2`` or ``subject``); a form keys its
    widgets by the same names in snake case, so each error finds its widget.
    An error whose field has no widget on the form is shown at the end.
    """

    def __init__(self, state_key: str) -> None:
        self.state_key = state_key

    @property
    def errors(self) -> dict[str, str]:
        return st.session_state.setdefault(self.state_key, {})

    def clear(self) -> None:
        st.session_state[self.state_key] = {}

    @staticmethod
    def key_of(field: str | None) -> str:
        """The form key of a domain field name ("" for the object as a whole)."""
        return _normalise(field) if field else ""

    def add(self, exc: ValidationError) -> None:
        self.errors[self.key_of(exc.field)] = exc.reason

    def show(self, key: str) -> None:
        """Show the error of ``key`` (if any) right where this is called."""
        message = self.errors.get(key)
        if message:
            st.error(message, icon=":material/error:")

    def show_unplaced(self, known: set[str]) -> None:
        """Show errors whose field has no widget on the form."""
        for key, message in self.errors.items():
            if key not in known:
                label = key.replace("_", " ") if key else ""
                st.error(
                    f"{label}: {message}" if label else message,
                    icon=":material/error:",
                )


# --- Emails --------------------------------------------------------------------


def email_frame(body: str, *, height: int = 480) -> None:
    """Show an email's HTML in a sandboxed frame.

    The HTML is written by users and filled with record values, so it runs in
    an inner ``<iframe sandbox>`` with no scripts, forms or same-origin access;
    links may only open a new tab.
    """
    wrapper = (
        '<iframe title="Email preview" '
        'sandbox="allow-popups allow-popups-to-escape-sandbox" '
        f'style="width:100%;height:{height - 10}px;border:1px solid #ddd;'
        f'background:#fff" srcdoc="{html.escape(body, quote=True)}"></iframe>'
    )
    st.iframe(wrapper, height=height)


def progress_reporter(label: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that drives an ``st.progress`` bar."""
    bar = st.progress(0.0, text=label)

    def report(done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        bar.progress(min(fraction, 1.0), text=f"{label} {done:,} / {total:,}")

    return report


# --- CSV import ----------------------------------------------------------------


def csv_import(entity: str, *, key: str, default_key: str | None = None) -> None:
    """Upload, preview, choose the key column, import with progress, report.

    Shared by the records and the contacts pages: both import through
    ``sequencer.csv_import``, so every row fires sequences like a typed edit.
    """
    from sequencer import csv_import as importer

    upload = st.file_uploader("CSV file", type=["csv", "txt"], key=f"{key}_file")
    if upload is None:
        st.caption(
            "UTF-8 (with or without BOM) or Latin-1, comma or semicolon "
            "separated; day-first dates; decimal commas are read for numbers."
        )
        return
    content = upload.getvalue()
    try:
        with session() as db_session:
            preview = importer.preview_csv(content, entity, rows=5, session=db_session)
    except SequencerError as exc:
        st.error(str(exc))
        return

    st.caption(
        f"Read as {preview.encoding}, separated by {preview.delimiter!r}. "
        "First rows, as read:"
    )
    st.dataframe(preview.frame, hide_index=True)
    for warning in preview.warnings:
        st.warning(warning)
    st.markdown("**How each column will be read**")
    st.dataframe(
        pd.DataFrame(
            {"column": list(preview.types), "read as": preview.types.values()}
        ),
        hide_index=True,
    )
    columns = [str(column) for column in preview.frame.columns]
    index = columns.index(default_key) + 1 if default_key in columns else 0
    key_column = st.selectbox(
        "Key column",
        [None, *columns],
        index=index,
        format_func=lambda c: "(none: every row creates a record)" if c is None else c,
        help="Rows whose key matches an existing record update it.",
        key=f"{key}_key",
    )
    if not st.button("Import", type="primary", key=f"{key}_run"):
        return

    report_progress = progress_reporter("Importing rows")
    try:
        with session() as db_session:
            report = importer.import_csv(
                db_session, entity, content, key=key_column, progress=report_progress
            )
    except SequencerError as exc:
        st.error(str(exc))
        return
    show_import_report(report)


def show_import_report(report: Any) -> None:
    """The import summary, with every rejected row and why."""
    created, updated, unchanged = st.columns(3)
    created.metric("Created", report.created)
    updated.metric("Updated", report.updated)
    unchanged.metric("Unchanged", report.unchanged)
    rejected, runs, errors = st.columns(3)
    rejected.metric("Rejected", len(report.rejected))
    runs.metric("Sequences run", report.sequences_run)
    errors.metric("Sequence errors", report.sequence_errors)
    for warning in report.warnings:
        st.warning(warning)
    st.toast(
        f"Import done: {report.created} created, {report.updated} updated, "
        f"{len(report.rejected)} rejected",
        icon=":material/check_circle:" if not report.rejected else ":material/warning:",
    )
    if report.rejected:
        st.markdown("**Rejected rows**")
        st.dataframe(
            pd.DataFrame(report.rejected, columns=["row", "reason"]),
            hide_index=True,
        )
