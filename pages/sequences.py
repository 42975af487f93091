"""Sequences: the list, its filters, and the actions on one sequence."""

from __future__ import annotations

import streamlit as st

from pages import ui
from sequencer import entities, groups, sequences

FORM_PAGE = "pages/sequence_form.py"
GROUPS_PAGE = "pages/entity_groups.py"

st.title("Sequences")
st.caption(
    "A sequence watches an entity and, when one of its records is created or "
    "updated and the conditions hold, creates or updates another record."
)

with ui.session() as session:
    group_list = groups.list_groups(session)
    entity_list = entities.list_entities(session)

# Buttons first: they are what a new admin looks for.
with st.container(horizontal=True):
    if st.button("Create a sequence", type="primary", icon=":material/add:"):
        st.switch_page(FORM_PAGE)
    if st.button("Create an entity group", icon=":material/create_new_folder:"):
        st.session_state["group_create_open"] = True
        st.switch_page(GROUPS_PAGE)

# Filters.
group_col, entity_col, active_col = st.columns(3)
group = group_col.selectbox(
    "Entity group",
    group_list,
    index=None,
    format_func=lambda g: g["name"],
    placeholder="All groups",
    key="seq_filter_group",
)
entity = entity_col.selectbox(
    "Entity",
    entity_list,
    index=None,
    format_func=lambda e: e.label,
    placeholder="All entities",
    key="seq_filter_entity",
)
active_choice = active_col.selectbox(
    "Active", ["All", "Active", "Inactive"], key="seq_filter_active"
)
active = {"All": None, "Active": True, "Inactive": False}[active_choice]

with ui.session() as session:
    table = sequences.list_sequences(
        session,
        group_id=group["id"] if group else None,
        entity_id=entity.id if entity else None,
        active=active,
    )

if table.empty:
    st.info("No sequence matches. Create one with the button above.")
    st.stop()

st.dataframe(
    ui.localize(table),
    hide_index=True,
    column_order=[
        "id",
        "name",
        "trigger",
        "target",
        "active",
        "conditions",
        "last_run",
        "runs",
        "errors",
    ],
    column_config={
        "id": st.column_config.NumberColumn("Id", width="small"),
        "name": "Name",
        "trigger": "Trigger",
        "target": "Target",
        "active": st.column_config.CheckboxColumn("Active"),
        "last_run": st.column_config.DatetimeColumn(
            "Last run", format="YYYY-MM-DD HH:mm"
        ),
        "conditions": st.column_config.NumberColumn("Conditions"),
        "runs": st.column_config.NumberColumn("Runs"),
        "errors": st.column_config.NumberColumn("Errors"),
    },
)
ui.zone_caption()

# Actions on one sequence.
st.subheader("Act on a sequence")
names = dict(zip(table["id"], table["name"], strict=True))
actives = dict(zip(table["id"], table["active"], strict=True))
chosen = st.selectbox(
    "Sequence",
    list(names),
    format_func=lambda sequence_id: names[sequence_id],
    key="seq_chosen",
)
is_active = bool(actives[chosen])
edit, duplicate, toggle, preview, delete = st.columns(5)
if edit.button("Edit", icon=":material/edit:", width="stretch", key="seq_edit"):
    st.switch_page(FORM_PAGE, query_params={"id": str(chosen)})
if preview.button(
    "Preview", icon=":material/visibility:", width="stretch", key="seq_preview"
):
    st.switch_page(FORM_PAGE, query_params={"id": str(chosen), "preview": "1"})
if duplicate.button("Duplicate", icon=":material/content_copy:", width="stretch"):
    ui.run_action(
        lambda s: sequences.duplicate_sequence(s, chosen),
        lambda copy: (
            f"Duplicated as '{copy.name}' (inactive until you activate it)"
            if not copy.active
            else f"Duplicated as '{copy.name}'"
        ),
    )
if toggle.button(
    "Deactivate" if is_active else "Activate",
    icon=":material/toggle_on:" if is_active else ":material/toggle_off:",
    width="stretch",
):
    ui.run_action(
        lambda s: sequences.set_active(s, chosen, not is_active),
        f"'{names[chosen]}' {'deactivated' if is_active else 'activated'}",
    )
if delete.button("Delete", icon=":material/delete:", width="stretch", key="seq_delete"):
    st.session_state["seq_confirm_delete"] = chosen

# Deleting asks once more, naming what will go.
if st.session_state.get("seq_confirm_delete") == chosen:
    st.warning(
        f"Delete the sequence '{names[chosen]}' and its run log? "
        "Records it created stay."
    )
    yes, no, _ = st.columns([1, 1, 4])
    if yes.button("Yes, delete", type="primary", key="seq_delete_yes"):
        st.session_state.pop("seq_confirm_delete")
        ui.run_action(
            lambda s: sequences.delete_sequence(s, chosen),
            f"Sequence '{names[chosen]}' deleted",
        )
    if no.button("Keep it", key="seq_delete_no"):
        st.session_state.pop("seq_confirm_delete")
        st.rerun()
