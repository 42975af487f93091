"""One emailing: its rendered preview, its recipients, and what can be done."""

from __future__ import annotations

import streamlit as st

from pages import ui
from sequencer import delivery, records, stats, templating
from sequencer.enums import EmailingStatus
from sequencer.exceptions import SequencerError
from sequencer.system import EMAILING

LIST_PAGE = "pages/emailings.py"
REFRESH_SECONDS = 3
PREVIEW_CONTACT = {"email": "preview@example.com", "name": "Preview Contact"}

raw_id = st.query_params.get("id")
emailing_id = int(raw_id) if raw_id and raw_id.isdigit() else None
st.page_link(LIST_PAGE, label="All emailings", icon=":material/arrow_back:")
if emailing_id is None:
    st.title("Emailing")
    st.info("Choose an emailing on the Emailings page.")
    st.stop()
try:
    with ui.session() as session:
        emailing = records.get_record(session, EMAILING, emailing_id)
except SequencerError as exc:
    st.title("Emailing")
    st.error(str(exc))
    st.stop()

st.title(emailing["subject"] or f"Emailing {emailing_id}")
status = str(emailing["status"])
send_at = emailing.get("send_at")
when = f"send at {ui.local_time(send_at)} ({ui.zone()})" if send_at else "no send time"
st.caption(
    f"#{emailing_id} · {status} · {when} · from {emailing.get('sender_name')} "
    f"<{emailing.get('sender_email')}>"
    + (f" · reference {emailing['reference']}" if emailing.get("reference") else "")
)


WAITING = {EmailingStatus.PENDING, EmailingStatus.SENDING}


@st.fragment(run_every=REFRESH_SECONDS if status in WAITING else None)
def counters() -> None:
    """The counters, refreshed on their own until the emailing has gone.

    When the status changes (sending started, or ended) the whole page runs
    again, so recipients and actions follow.
    """
    with ui.session() as session:
        current = delivery.sending_state(session, emailing_id)
    if current["status"] != status:
        st.rerun()
    if current["note"]:
        st.info(current["note"], icon=":material/info:")
    names = ["total", "sent", "open", "click", "unsubscribe", "bounce"]
    for column, name in zip(st.columns(len(names)), names, strict=True):
        column.metric(name.capitalize(), current[name])
    if current["deliveries"]:
        st.caption(
            "Recipients: "
            + " · ".join(f"{n} {state}" for state, n in current["deliveries"].items())
        )


counters()

# Actions: what applies depends on the status.
cancel_col, now_col, test_col = st.columns([1, 1, 3])
can_cancel = status in {
    EmailingStatus.PENDING,
    EmailingStatus.SENDING,
    EmailingStatus.DRAFT,
}
if cancel_col.button(
    "Cancel", disabled=not can_cancel, icon=":material/cancel:", key="emailing_cancel"
):
    st.session_state["emailing_confirm_cancel"] = emailing_id
if now_col.button(
    "Send now",
    disabled=status not in {EmailingStatus.PENDING, EmailingStatus.DRAFT},
    icon=":material/send:",
    type="primary",
    key="emailing_send_now",
):
    ui.run_action(
        lambda s: delivery.send_now(s, emailing_id),
        f"Emailing {emailing_id} will go out on the next pass",
    )
with test_col.form("send_test", border=False):
    address_col, button_col = st.columns([3, 1], vertical_alignment="bottom")
    address = address_col.text_input(
        "Send a test to", placeholder="you@example.com", key="emailing_test_address"
    )
    if button_col.form_submit_button(
        "Send test", icon=":material/science:", key="emailing_send_test"
    ):
        ui.run_action(
            lambda s: delivery.send_test(s, emailing_id, address.strip()),
            lambda reply: reply,
            rerun=False,
        )
if st.session_state.get("emailing_confirm_cancel") == emailing_id:
    st.warning("Cancel this emailing? Recipients not yet sent will be skipped.")
    yes, no, _ = st.columns([1, 1, 4])
    if yes.button("Yes, cancel it", type="primary", key="emailing_cancel_yes"):
        st.session_state.pop("emailing_confirm_cancel")
        ui.run_action(
            lambda s: delivery.cancel_emailing(s, emailing_id),
            f"Emailing {emailing_id} cancelled",
        )
    if no.button("Keep sending", key="emailing_cancel_no"):
        st.session_state.pop("emailing_confirm_cancel")
        st.rerun()

preview_tab, recipients_tab, events_tab = st.tabs(["Preview", "Recipients", "Events"])
with preview_tab:
    st.caption(
        "Recipient variables are filled for a sample contact "
        f"({PREVIEW_CONTACT['email']})."
    )
    try:
        body = templating.render_for_recipient(
            emailing.get("html") or "",
            contact=PREVIEW_CONTACT,
            unsubscribe_url="#unsubscribe",
            html=True,
        )
        text = templating.render_for_recipient(
            emailing.get("message") or "",
            contact=PREVIEW_CONTACT,
            unsubscribe_url="#unsubscribe",
            html=False,
        )
    except SequencerError as exc:
        st.error(str(exc))
    else:
        if body.strip():
            ui.email_frame(body)
        st.markdown("**Text part**")
        st.text(text or "(derived from the HTML when sent)")

with recipients_tab:
    with ui.session() as session:
        recipients = stats.recipients(session, emailing_id)
    if recipients.empty:
        st.info("Recipients are resolved when the emailing starts sending.")
    else:
        st.dataframe(
            ui.localize(recipients),
            hide_index=True,
            column_config=ui.labels(
                recipients,
                delivery_id=st.column_config.NumberColumn("Delivery", format="%d"),
                smtp_reply=st.column_config.TextColumn("SMTP reply", width="large"),
            ),
        )
        ui.zone_caption()

with events_tab:
    with ui.session() as session:
        events = stats.recipient_events(session, emailing_id)
    if events.empty:
        st.info("No open, click, unsubscribe or bounce yet.")
    else:
        st.dataframe(
            ui.localize(events), hide_index=True, column_config=ui.labels(events)
        )
        ui.zone_caption()
