"""Emailings: every campaign with its status, counters and rates."""

from __future__ import annotations

import streamlit as st

from pages import ui
from sequencer import stats
from sequencer.enums import EmailingStatus

DETAIL_PAGE = "pages/emailing_detail.py"
RATE_FORMAT = "percent"

st.title("Emailings")

status_col, search_col = st.columns([1, 2])
statuses = status_col.multiselect(
    "Status", [s.value for s in EmailingStatus], key="emailings_status"
)
search = search_col.text_input(
    "Search", placeholder="subject or reference", key="emailings_search"
)

with ui.session() as session:
    table = stats.emailings_table(session)

# Narrow what is shown; the table itself comes whole from the domain.
if statuses:
    table = table[table["status"].isin(statuses)]
if search:
    needle = search.lower()
    haystack = table["subject"].fillna("") + " " + table["reference"].fillna("")
    table = table[haystack.str.lower().str.contains(needle, regex=False)]

if table.empty:
    st.info("No emailing matches. Sequences create emailings as records change.")
    st.stop()

percent = {"format": RATE_FORMAT}
st.caption(
    "Rates from the counters (people only): open, click and unsubscribe over "
    "sent; click-to-open over opens; bounce over sent and bounced."
)
st.dataframe(
    ui.localize(table, ["send_at", "created_at", "finished_at"]),
    hide_index=True,
    column_order=[
        "id",
        "subject",
        "reference",
        "sequence",
        "status",
        "send_at",
        "total",
        "sent",
        "open",
        "click",
        "unsubscribe",
        "bounce",
        "open_rate",
        "click_rate",
        "ctor",
        "unsubscribe_rate",
        "bounce_rate",
        "note",
    ],
    column_config=ui.labels(
        table,
        id=st.column_config.NumberColumn("Id", width="small"),
        send_at=st.column_config.DatetimeColumn("Send at", format="YYYY-MM-DD HH:mm"),
        open_rate=st.column_config.NumberColumn("Open rate", **percent),
        click_rate=st.column_config.NumberColumn("Click rate", **percent),
        ctor=st.column_config.NumberColumn("Click-to-open", **percent),
        unsubscribe_rate=st.column_config.NumberColumn("Unsubscribe rate", **percent),
        bounce_rate=st.column_config.NumberColumn("Bounce rate", **percent),
        note=st.column_config.TextColumn("Note", width="large"),
    ),
)
ui.zone_caption()

subjects = dict(zip(table["id"], table["subject"], strict=True))
chosen = st.selectbox(
    "Emailing",
    list(subjects),
    format_func=lambda i: f"#{i} {subjects[i]}",
    key="emailings_chosen",
)
if st.button("Open the emailing", type="primary", icon=":material/open_in_new:"):
    st.switch_page(DETAIL_PAGE, query_params={"id": str(chosen)})
