"""Activity: the sequence run log, errors first."""

from __future__ import annotations

import streamlit as st

from pages import ui
from sequencer import runlog, sequences
from sequencer.enums import RunOutcome

st.title("Activity")
st.caption(
    "One line per sequence run: what fired it, how it ended, what it wrote. "
    "Errors come first."
)

with ui.session() as session:
    sequence_table = sequences.list_sequences(session)
names = dict(zip(sequence_table["id"], sequence_table["name"], strict=True))

outcome_col, sequence_col, limit_col = st.columns([1, 2, 1])
outcome = outcome_col.selectbox(
    "Outcome",
    [None, *[o.value for o in RunOutcome]],
    format_func=lambda o: "All" if o is None else o,
    key="activity_outcome",
)
sequence_id = sequence_col.selectbox(
    "Sequence",
    [None, *names],
    format_func=lambda i: "All" if i is None else names[i],
    key="activity_sequence",
)
limit = limit_col.selectbox("Show", [100, 500, 2000], index=1, key="activity_limit")

with ui.session() as session:
    runs = runlog.list_runs(
        session, outcome=outcome, sequence_id=sequence_id, limit=limit
    )

if runs.empty:
    st.info("No sequence has run yet. Runs appear here as records change.")
    st.stop()

errors = int((runs["outcome"] == RunOutcome.ERROR).sum())
done = int((runs["outcome"] == RunOutcome.DONE).sum())
skipped = int((runs["outcome"] == RunOutcome.SKIPPED).sum())
error_col, done_col, skipped_col = st.columns(3)
error_col.metric("Errors", errors)
done_col.metric("Done", done)
skipped_col.metric("Skipped", skipped)

st.dataframe(ui.localize(runs), hide_index=True)
ui.zone_caption()
