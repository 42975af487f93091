"""Contacts: who receives emailings, their status, tags and lists."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages import ui
from sequencer import records
from sequencer.enums import ContactStatus
from sequencer.system import CONTACT, CONTACT_LIST

st.title("Contacts")

with ui.session() as session:
    list_table = records.list_records(session, CONTACT_LIST)
list_names = {int(row["id"]): str(row["name"]) for _, row in list_table.iterrows()}

contacts_tab, lists_tab, import_tab = st.tabs(["Contacts", "Lists", "Import CSV"])


def _tags(raw: str) -> list[str]:
    return [tag.strip() for tag in raw.split(",") if tag.strip()]


def _as_list(value) -> list:
    """Tags and list ids as a plain list, whatever the table cell holds."""
    if isinstance(value, list | tuple):
        return list(value)
    if hasattr(value, "tolist"):
        return list(value.tolist())
    return []


with contacts_tab:
    search_col, status_col, tag_col, list_col = st.columns([2, 1, 1, 1])
    search = search_col.text_input(
        "Search", placeholder="email or name", key="contacts_search"
    )
    status = status_col.selectbox(
        "Status",
        [None, *[s.value for s in ContactStatus]],
        format_func=lambda s: "All" if s is None else s,
        key="contacts_status",
    )
    tag = tag_col.text_input("Tag", key="contacts_tag")
    in_list = list_col.selectbox(
        "List",
        [None, *list_names],
        format_func=lambda i: "All" if i is None else list_names[i],
        key="contacts_list",
    )
    with ui.session() as session:
        table = records.list_records(session, CONTACT, search=search or None)

    # Narrow what is shown; the domain already did the text search.
    if status and "status" in table:
        table = table[table["status"] == status]
    if tag and "tags" in table:
        table = table[table["tags"].map(lambda tags: tag in _as_list(tags))]
    if in_list is not None and "lists" in table:
        table = table[table["lists"].map(lambda ids: in_list in _as_list(ids))]

    counts = table["status"].value_counts() if "status" in table else pd.Series()
    shown, subscribed, unsubscribed, bounced = st.columns(4)
    shown.metric("Shown", len(table))
    subscribed.metric("Subscribed", int(counts.get("subscribed", 0)))
    unsubscribed.metric("Unsubscribed", int(counts.get("unsubscribed", 0)))
    bounced.metric("Bounced", int(counts.get("bounced", 0)))

    display = ui.localize(table)
    if "lists" in display:
        display["lists"] = display["lists"].map(
            lambda ids: ", ".join(list_names.get(int(i), str(i)) for i in _as_list(ids))
        )
    st.dataframe(display, hide_index=True)
    ui.zone_caption()

    st.subheader("Add or edit a contact")
    ids = [None, *[int(value) for value in table["id"]]] if not table.empty else [None]
    labels = {
        int(row["id"]): f"{row['email']} {row.get('name') or ''}".strip()
        for _, row in table.iterrows()
    }
    chosen = st.selectbox(
        "Contact",
        ids,
        format_func=lambda i: "New contact" if i is None else labels[i],
        key="contacts_chosen",
    )
    row = table.loc[table["id"] == chosen].iloc[0] if chosen is not None else None
    suffix = chosen or "new"
    with st.form(f"contact_form_{chosen}"):
        email = st.text_input(
            "Email *",
            value="" if row is None else row["email"],
            key=f"contact_email_{suffix}",
        )
        name = st.text_input("Name", value="" if row is None else row.get("name") or "")
        tags = st.text_input(
            "Tags",
            value="" if row is None else ", ".join(map(str, _as_list(row.get("tags")))),
            help="Separate tags with commas.",
            key=f"contact_tags_{suffix}",
        )
        lists = st.multiselect(
            "Lists",
            list(list_names),
            default=[]
            if row is None
            else [int(i) for i in _as_list(row.get("lists")) if int(i) in list_names],
            format_func=list_names.get,
            key=f"contact_lists_{suffix}",
        )
        if row is not None:
            st.caption(f"Status: {row.get('status', '')}")
        if st.form_submit_button(
            "Save contact", type="primary", key=f"contact_save_{suffix}"
        ):
            values = {
                "email": email.strip(),
                "name": name.strip(),
                "tags": _tags(tags),
                "lists": lists,
            }
            if chosen is None:
                ui.run_action(
                    lambda s: records.create_record(s, CONTACT, values),
                    lambda r: f"Contact {r.record['id']} created. {r.summary()}",
                )
            else:
                ui.run_action(
                    lambda s: records.update_record(s, CONTACT, chosen, values),
                    lambda r: f"Contact {chosen} saved. {r.summary()}",
                )

with lists_tab:
    st.dataframe(ui.localize(list_table), hide_index=True)
    with st.form("list_create", clear_on_submit=True):
        st.markdown("**Create a list**")
        new_name = st.text_input("Name *")
        description = st.text_input("Description")
        if st.form_submit_button("Create the list", type="primary"):
            ui.run_action(
                lambda s: records.create_record(
                    s,
                    CONTACT_LIST,
                    {"name": new_name.strip(), "description": description.strip()},
                ),
                lambda r: f"List '{r.record['name']}' created (id {r.record['id']})",
            )
    st.caption("Add contacts to a list from the Contacts tab, or by CSV import.")

with import_tab:
    st.caption(
        "Addresses are matched case-insensitively; a 'lists' column takes list ids "
        "and a 'tags' column takes comma-separated tags."
    )
    ui.csv_import(CONTACT, key="contacts_import", default_key="email")
