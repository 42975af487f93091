"""Entities and records: browse and edit records, import CSV, define entities.

Every edit goes through ``sequencer.records``, so it fires sequences exactly
like an import or an API call, and the toast says what ran.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages import ui
from sequencer import entities, records
from sequencer.enums import PropertyType
from sequencer.exceptions import SequencerError
from sequencer.types import format_value

SYSTEM_COLUMNS = ["id", "reference", "created_at", "updated_at"]
TYPES = [kind.value for kind in PropertyType]

st.title("Entities & records")

with ui.session() as session:
    entity_list = entities.list_entities(session, include_system=False)
    properties = {e.name: entities.properties_of(session, e) for e in entity_list}
labels = {entity.name: entity.label for entity in entity_list}

records_tab, import_tab, definition_tab = st.tabs(
    ["Records", "Import CSV", "Entities and properties"]
)


def _write_summary(result) -> str:
    """The toast for one write: what it did, then what the sequences did."""
    verb = "created" if result.created else "updated"
    if result.event_id is None and not result.created:
        return f"Record {result.record['id']}: nothing changed"
    summary = result.summary()
    return f"Record {result.record['id']} {verb}. {summary[:1].upper()}{summary[1:]}"


def _as_text(prop, value) -> str:
    """A stored value as the one-record form shows it (times in the user's zone)."""
    if not isinstance(value, list | tuple) and (value is None or pd.isna(value)):
        return ""
    return format_value(prop.type, value, timezone=ui.zone())


def _save_editor(entity: str, table: pd.DataFrame, changes: dict) -> None:
    """Save the rows edited or added in the grid, each in its own transaction.

    A row that fails shows its error and does not stop the others.
    """
    editable = [p.name for p in properties[entity] if not p.read_only]
    messages, failures = [], []
    for position, edited in changes.get("edited_rows", {}).items():
        record_id = int(table.iloc[int(position)]["id"])
        values = {k: v for k, v in edited.items() if k in editable}
        try:
            with ui.session() as session:
                result = records.update_record(session, entity, record_id, values)
            messages.append(_write_summary(result))
        except SequencerError as exc:
            failures.append(f"Record {record_id}: {exc}")
    for added in changes.get("added_rows", []):
        values = {k: v for k, v in added.items() if k in editable and v is not None}
        try:
            with ui.session() as session:
                result = records.create_record(session, entity, values)
            messages.append(_write_summary(result))
        except SequencerError as exc:
            failures.append(f"New row: {exc}")
    for message in messages:
        ui.flash(message)
    st.session_state["records_failures"] = failures
    # A new key gives a fresh grid showing the saved values.
    st.session_state["records_editor_version"] = (
        st.session_state.get("records_editor_version", 0) + 1
    )
    st.rerun()


def _definition(entity) -> None:
    """One entity's properties, with forms to add, change and delete."""
    props = properties[entity.name]
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "name": p.name,
                    "label": p.label,
                    "type": str(p.type),
                    "required": p.required,
                }
                for p in props
            ]
        ),
        hide_index=True,
    )
    with st.form(f"prop_add_{entity.name}", clear_on_submit=True):
        st.markdown("**Add a property**")
        cols = st.columns([2, 2, 1, 1])
        name = cols[0].text_input("Name", key=f"pa_n_{entity.name}")
        label = cols[1].text_input("Label", key=f"pa_l_{entity.name}")
        kind = cols[2].selectbox("Type", TYPES, key=f"pa_t_{entity.name}")
        required = cols[3].checkbox("Required", key=f"pa_r_{entity.name}")
        if st.form_submit_button("Add"):
            ui.run_action(
                lambda s: entities.add_property(
                    s,
                    entity.name,
                    name=name.strip(),
                    label=label.strip() or None,
                    type=kind,
                    required=required,
                ),
                f"Property '{name.strip()}' added to {entity.label}",
            )
    if props:
        with st.form(f"prop_edit_{entity.name}"):
            st.markdown("**Change or delete a property**")
            cols = st.columns([2, 2, 1])
            chosen = cols[0].selectbox(
                "Property", [p.name for p in props], key=f"pe_p_{entity.name}"
            )
            new_label = cols[1].text_input(
                "New label (empty: keep)", key=f"pe_l_{entity.name}"
            )
            new_required = cols[2].checkbox("Required", key=f"pe_r_{entity.name}")
            save, remove, _ = st.columns([1, 1, 3])
            if save.form_submit_button("Save property"):
                ui.run_action(
                    lambda s: entities.update_property(
                        s,
                        entity.name,
                        chosen,
                        label=new_label.strip() or None,
                        required=new_required,
                    ),
                    f"Property '{chosen}' of {entity.label} saved",
                )
            if remove.form_submit_button("Delete property"):
                ui.run_action(
                    lambda s: entities.delete_property(s, entity.name, chosen),
                    f"Property '{chosen}' deleted from {entity.label}",
                )
    if st.button("Delete this entity", key=f"entity_delete_{entity.name}"):
        st.session_state["entity_confirm_delete"] = entity.name
    if st.session_state.get("entity_confirm_delete") == entity.name:
        st.warning(
            f"Delete {entity.label} with all its records? "
            "Sequences that use it must be deleted first."
        )
        if st.button("Yes, delete", key=f"entity_yes_{entity.name}"):
            st.session_state.pop("entity_confirm_delete")
            ui.run_action(
                lambda s: entities.delete_entity(s, entity.name),
                f"Entity {entity.label} deleted",
            )


with records_tab:
    if not entity_list:
        st.info("No entity yet: define one in the last tab.")
    else:
        pick, find = st.columns([1, 2])
        entity = pick.selectbox(
            "Entity", list(labels), format_func=labels.get, key="records_entity"
        )
        search = find.text_input("Search", key="records_search")
        with ui.session() as session:
            table = records.list_records(session, entity, search=search or None)

        for failure in st.session_state.pop("records_failures", []):
            st.error(failure)
        shown = ui.localize(table, ["created_at", "updated_at"])
        version = st.session_state.get("records_editor_version", 0)
        changes_key = f"records_editor_{entity}_{version}"
        st.data_editor(
            shown,
            hide_index=True,
            num_rows="add",
            disabled=[c for c in SYSTEM_COLUMNS if c in shown.columns],
            column_config={p.name: p.label for p in properties[entity]},
            key=changes_key,
        )
        ui.zone_caption()
        changes = st.session_state.get(changes_key, {})
        pending = len(changes.get("edited_rows", {})) + len(
            changes.get("added_rows", [])
        )
        if st.button(
            f"Save {pending} change{'s' if pending != 1 else ''}",
            type="primary",
            disabled=not pending,
            key="records_save",
        ):
            _save_editor(entity, table, changes)

        # One record at a time, for long values and for keyboards.
        st.subheader("Edit one record")
        if table.empty:
            st.caption("No record yet.")
        else:
            first = properties[entity][0].name if properties[entity] else "id"
            names = dict(zip(table["id"].astype(int), table[first], strict=True))
            record_id = st.selectbox(
                "Record",
                list(names),
                format_func=lambda rid: f"#{rid} {names[rid]}",
                key="records_one",
            )
            row = table.loc[table["id"] == record_id].iloc[0]
            # Keys follow the stored version, so a save anywhere refreshes the form.
            stamp = pd.Timestamp(row["updated_at"]).value
            with st.form(f"record_form_{entity}_{record_id}"):
                before, after = {}, {}
                for prop in properties[entity]:
                    before[prop.name] = _as_text(prop, row.get(prop.name))
                    after[prop.name] = st.text_input(
                        prop.label + (" *" if prop.required else ""),
                        value=before[prop.name],
                        key=f"record_field_{entity}_{record_id}_{stamp}_{prop.name}",
                    )
                if st.form_submit_button(
                    "Save record",
                    type="primary",
                    key=f"record_save_{entity}_{record_id}",
                ):
                    changed = {
                        name: value
                        for name, value in after.items()
                        if value != before[name]
                    }
                    ui.run_action(
                        lambda s: records.update_record(s, entity, record_id, changed),
                        _write_summary,
                    )

with import_tab:
    if not entity_list:
        st.info("No entity yet: define one in the last tab.")
    else:
        target = st.selectbox(
            "Entity", list(labels), format_func=labels.get, key="import_entity"
        )
        ui.csv_import(target, key=f"import_{target}")

with definition_tab:
    for entity in entity_list:
        with st.expander(f"{entity.label} (`{entity.name}`)"):
            _definition(entity)

    st.subheader("Define a new entity")
    with st.form("entity_create"):
        name_col, label_col = st.columns(2)
        new_name = name_col.text_input(
            "Name *", help="Key used in templates, e.g. produits"
        )
        new_label = label_col.text_input("Label *", help="What the dashboard shows")
        new_properties = st.data_editor(
            pd.DataFrame(
                {"name": [""], "label": [""], "type": ["text"], "required": [False]}
            ),
            num_rows="dynamic",
            hide_index=True,
            column_config={
                "type": st.column_config.SelectboxColumn("type", options=TYPES),
                "required": st.column_config.CheckboxColumn("required"),
            },
            key="entity_create_properties",
        )
        if st.form_submit_button("Create the entity", type="primary"):
            rows = [
                {
                    "name": str(row["name"]).strip(),
                    "label": str(row["label"] or row["name"]).strip(),
                    "type": row["type"] or "text",
                    "required": bool(row["required"]),
                }
                for _, row in new_properties.iterrows()
                if str(row["name"] or "").strip()
            ]
            ui.run_action(
                lambda s: entities.create_entity(
                    s,
                    name=new_name.strip(),
                    label=new_label.strip() or new_name.strip(),
                    properties=rows,
                ),
                f"Entity '{new_label or new_name}' created",
            )
