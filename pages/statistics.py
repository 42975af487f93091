"""Statistics: how the emailings did, for marketing analysts.

The aggregation runs in SQL (``sequencer.stats``); this page caches each
result briefly and refreshes on its own while an emailing is sending.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pandas as pd
import streamlit as st

from pages import charts, ui
from sequencer import groups, sequences, stats
from sequencer.config import get_settings
from sequencer.enums import EmailingStatus

CACHE_SECONDS = 10
REFRESH_SECONDS = 5


# The database URL is part of every cache key: two databases never share one.
@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def load_figures(database_url: str, **filters) -> dict:
    with ui.session() as session:
        return stats.figures(session, **filters)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def load_activity(database_url: str, bucket: str, **filters) -> pd.DataFrame:
    with ui.session() as session:
        return stats.activity_over_time(session, bucket=bucket, **filters)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def load_comparison(database_url: str, **filters) -> pd.DataFrame:
    with ui.session() as session:
        return stats.emailing_comparison(session, **filters)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def load_per_sequence(database_url: str, **filters) -> pd.DataFrame:
    with ui.session() as session:
        return stats.per_sequence(session, **filters)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def load_top_links(database_url: str, **filters) -> pd.DataFrame:
    with ui.session() as session:
        return stats.top_links(session, **filters)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def load_emailings(database_url: str) -> pd.DataFrame:
    with ui.session() as session:
        return stats.emailings_table(session)


def _local_bounds(first: date, last: date) -> tuple[datetime, datetime]:
    """Whole local days from ``first`` to ``last``, as UTC instants."""
    zone = ZoneInfo(ui.zone())
    start = datetime.combine(first, time.min, tzinfo=zone)
    end = datetime.combine(last + timedelta(days=1), time.min, tzinfo=zone)
    return start, end


def _rate_text(figure: dict) -> str:
    return f"{figure['rate']:.1%}"


def _ratio_caption(figure: dict) -> str:
    return f"{figure['numerator']:,} of {figure['denominator']:,}"


st.title("Statistics")
database_url = get_settings().database_url

with ui.session() as session:
    group_list = groups.list_groups(session)
    sequence_table = sequences.list_sequences(session)
emailing_table = load_emailings(database_url)
sequence_names = dict(zip(sequence_table["id"], sequence_table["name"], strict=True))
emailing_names = dict(zip(emailing_table["id"], emailing_table["subject"], strict=True))

# Filters.
today = datetime.now(ZoneInfo(ui.zone())).date()
range_col, group_col, sequence_col, emailing_col = st.columns([2, 1, 1, 1])
chosen_range = range_col.date_input(
    "Dates", value=(today - timedelta(days=30), today), key="stats_dates"
)
group = group_col.selectbox(
    "Entity group",
    group_list,
    index=None,
    format_func=lambda g: g["name"],
    placeholder="All groups",
    key="stats_group",
)
sequence_id = sequence_col.selectbox(
    "Sequence",
    list(sequence_names),
    index=None,
    format_func=sequence_names.get,
    placeholder="All sequences",
    key="stats_sequence",
)
emailing_id = emailing_col.selectbox(
    "Emailing",
    list(emailing_names),
    index=None,
    format_func=lambda i: f"#{i} {emailing_names[i]}",
    placeholder="All emailings",
    key="stats_emailing",
)
human_only = st.toggle(
    "People only",
    value=False,
    help="Leave out opens by mail privacy proxies and clicks by security "
    "scanners, which are kept and flagged apart.",
    key="stats_human_only",
)
if not isinstance(chosen_range, tuple) or len(chosen_range) != 2:
    st.info("Choose the last day of the range.")
    st.stop()
start, end = _local_bounds(*chosen_range)
filters = {
    "start": start,
    "end": end,
    "group_id": group["id"] if group else None,
    "sequence_id": sequence_id,
    "emailing_id": emailing_id,
    "human_only": human_only,
}
sending = bool((emailing_table["status"] == EmailingStatus.SENDING).any())


@st.fragment(run_every=REFRESH_SECONDS if sending else None)
def report() -> None:
    """Figures and charts; re-run alone every few seconds during a send."""
    if sending:
        st.caption(f"An emailing is sending: refreshed every {REFRESH_SECONDS} s.")
        still = load_emailings(database_url)["status"] == EmailingStatus.SENDING
        if not still.any():
            st.rerun()
    figures = load_figures(database_url, **filters)

    # Figures, each with what it was computed from.
    sent_col, delivered_col, *rate_cols = st.columns(7)
    sent_col.metric("Sent", f"{figures['sent']:,}")
    delivered_col.metric("Delivered", f"{figures['delivered']:,}")
    rates = [
        ("Open rate", "open_rate"),
        ("Click rate", "click_rate"),
        ("Click-to-open", "click_to_open_rate"),
        ("Unsubscribe rate", "unsubscribe_rate"),
        ("Bounce rate", "bounce_rate"),
    ]
    for column, (label, key) in zip(rate_cols, rates, strict=True):
        column.metric(label, _rate_text(figures[key]))
        column.caption(_ratio_caption(figures[key]))
    st.caption(
        f"Events: {figures['opens']:,} opens and {figures['clicks']:,} clicks"
        + (
            ""
            if human_only
            else f", of which {figures['machine_opens']:,} opens and "
            f"{figures['machine_clicks']:,} clicks by machines (privacy proxies, "
            "link scanners)"
        )
        + ". Rates count recipients, once each."
    )

    # Charts.
    bucket = "hour" if end - start <= stats.HOURLY_SPAN else "day"
    activity = load_activity(database_url, bucket, **filters)
    st.subheader("Opens and clicks over time")
    st.altair_chart(charts.activity_over_time(activity, ui.zone()), width="stretch")

    comparison = load_comparison(database_url, **filters)
    left, right = st.columns(2)
    with left:
        st.subheader("Emailings compared")
        st.altair_chart(charts.emailing_comparison(comparison), width="stretch")
    with right:
        st.subheader("Per sequence")
        per_sequence = load_per_sequence(database_url, **filters)
        st.altair_chart(charts.per_sequence(per_sequence), width="stretch")

    st.subheader("Top clicked links")
    links = load_top_links(database_url, **filters)
    st.altair_chart(charts.top_links(links), width="stretch")

    # The table behind the comparison, and its export.
    st.subheader("Emailings in this range")
    shown = ui.localize(comparison)
    st.dataframe(shown, hide_index=True)
    ui.zone_caption()
    st.download_button(
        "Export as CSV",
        shown.to_csv(index=False).encode("utf-8"),
        file_name=f"sequencer-statistics-{chosen_range[0]}-{chosen_range[1]}.csv",
        mime="text/csv",
        icon=":material/download:",
    )


report()
