"""Entity groups: named lists of entities that organise sequences and statistics."""

from __future__ import annotations

import streamlit as st

from pages import ui
from sequencer import entities, groups
from sequencer.exceptions import ValidationError

st.title("Entity groups")
st.caption("Groups filter the sequences list and the statistics.")

with ui.session() as session:
    group_list = groups.list_groups(session)
    entity_list = entities.list_entities(session)
entity_labels = {entity.id: entity.label for entity in entity_list}

# Create: opened directly when coming from "Create an entity group".
with st.expander(
    "Create an entity group",
    expanded=st.session_state.pop("group_create_open", False) or not group_list,
):
    with st.form("group_create", clear_on_submit=True):
        name = st.text_input("Name *", key="group_create_name")
        chosen = st.multiselect(
            "Entities",
            list(entity_labels),
            format_func=entity_labels.get,
            key="group_create_entities",
        )
        if st.form_submit_button("Create", type="primary", key="group_create_submit"):
            try:
                with ui.session() as session:
                    created = groups.create_group(session, name.strip(), chosen)
            except ValidationError as exc:
                st.error(exc.reason if exc.field else str(exc))
            else:
                ui.flash(f"Group '{created.name}' created")
                st.rerun()

if not group_list:
    st.info("No entity group yet.")
    st.stop()


def _group_block(group: dict) -> None:
    """One group: rename it, choose its entities, or delete it."""
    group_id, group_name = group["id"], group["name"]
    st.markdown(f"**{group_name}**")
    new_name = st.text_input("Name", value=group_name, key=f"group_name_{group_id}")
    new_members = st.multiselect(
        "Entities",
        list(entity_labels),
        default=[e for e in group["entity_ids"] if e in entity_labels],
        format_func=entity_labels.get,
        key=f"group_members_{group_id}",
    )
    save, delete, _ = st.columns([1, 1, 4])
    if save.button("Save", key=f"group_save_{group_id}", type="primary"):
        try:
            # Name and members change together or not at all.
            with ui.session() as session:
                if new_name.strip() != group_name:
                    groups.rename_group(
                        session, group_id, new_name.strip(), commit=False
                    )
                groups.set_group_entities(session, group_id, new_members, commit=False)
        except ValidationError as exc:
            st.error(exc.reason if exc.field else str(exc))
        else:
            ui.flash(f"Group '{new_name.strip()}' saved")
            st.rerun()
    if delete.button("Delete", key=f"group_delete_{group_id}"):
        st.session_state["group_confirm_delete"] = group_id
    if st.session_state.get("group_confirm_delete") != group_id:
        return
    st.warning(f"Delete the group '{group_name}'? Its entities and sequences stay.")
    yes, no, _ = st.columns([1, 1, 4])
    if yes.button("Yes, delete", key=f"group_yes_{group_id}", type="primary"):
        st.session_state.pop("group_confirm_delete")
        ui.run_action(
            lambda s: groups.delete_group(s, group_id),
            f"Group '{group_name}' deleted",
        )
    if no.button("Keep it", key=f"group_no_{group_id}"):
        st.session_state.pop("group_confirm_delete")
        st.rerun()


for group in group_list:
    with st.container(border=True):
        _group_block(group)
