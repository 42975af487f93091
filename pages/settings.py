"""Settings: the active configuration and the state of the workers."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from sqlalchemy.engine import make_url

from pages import ui
from sequencer import backends, delivery, engine, scheduler
from sequencer.config import get_settings
from sequencer.exceptions import ValidationError

REFRESH_SECONDS = 5
settings = get_settings()


st.title("Settings")

# Configuration: read from the environment at start; see the README.
st.subheader("Configuration")
try:
    where = backends.describe_backend(settings)
except ValidationError as exc:
    where = f"nothing can be sent: {exc}"
    st.error(where, icon=":material/error:")
else:
    if settings.smtp_url:
        st.success(f"Email goes out through the {where}.", icon=":material/mail:")
    else:
        st.warning(where, icon=":material/inbox:")
config = {
    "Database": make_url(settings.database_url).render_as_string(hide_password=True),
    "Public URL": settings.public_url,
    "Rate (messages per second)": str(settings.smtp_rate or "no limit"),
    "SMTP connections": str(settings.smtp_connections),
    "Time zone": settings.timezone,
    "Scheduler tick (seconds)": str(settings.tick_seconds),
    "Tracking port (headless worker)": str(settings.tracking_port),
}
st.dataframe(
    pd.DataFrame({"setting": list(config), "value": list(config.values())}),
    hide_index=True,
)


@st.fragment(run_every=REFRESH_SECONDS)
def worker_state() -> None:
    """The workers' heartbeats and the queues, refreshed every few seconds."""
    with ui.session() as session:
        workers = scheduler.worker_status(session)
        pending = engine.pending_count(session)
        due = delivery.due_count(session)
    pending_col, due_col, alive_col = st.columns(3)
    pending_col.metric("Pending record events", pending)
    due_col.metric("Emailings due", due)
    alive = int(workers["alive"].sum()) if not workers.empty else 0
    alive_col.metric("Workers alive", alive)
    if workers.empty:
        st.warning("No worker has reported yet: nothing is sent until one runs.")
        return
    last_beat = workers["last_beat"].max()
    st.caption(f"Last heartbeat: {ui.local_time(last_beat, '%Y-%m-%d %H:%M:%S')}")
    if not alive:
        st.error(
            "No worker is running (stopped, or silent for a minute): start "
            "`python -m sequencer run` or `python -m sequencer worker`."
        )
    st.dataframe(
        ui.localize(workers, ["started_at", "last_beat"]),
        hide_index=True,
        column_config={
            "worker": "Worker",
            "host": "Host",
            "pid": st.column_config.NumberColumn("PID", format="%d"),
            "started_at": st.column_config.DatetimeColumn(
                "Started", format="YYYY-MM-DD HH:mm:ss"
            ),
            "alive": st.column_config.CheckboxColumn("Alive"),
            "last_beat": st.column_config.DatetimeColumn(
                "Last heartbeat", format="YYYY-MM-DD HH:mm:ss"
            ),
            "last_pass": st.column_config.TextColumn("Last pass", width="large"),
        },
    )
    ui.zone_caption()


st.subheader("Workers")
worker_state()
