"""The Sequencer dashboard: navigation between the pages under ``pages/``.

Run through ``python -m sequencer run`` (which also starts the scheduler and
the tracking routes); every page is a thin view over ``sequencer``.
"""

from __future__ import annotations

import streamlit as st

from pages import ui

st.set_page_config(page_title="Sequencer", page_icon="📨", layout="wide")

PAGES = {
    "Settings › Customisation": [
        st.Page(
            "pages/sequences.py",
            title="Sequences",
            icon=":material/account_tree:",
            default=True,
        ),
        st.Page(
            "pages/sequence_form.py",
            title="Sequence",
            url_path="sequence",
            visibility="hidden",
        ),
        st.Page(
            "pages/entity_groups.py",
            title="Entity groups",
            icon=":material/folder_special:",
            url_path="entity-groups",
        ),
        st.Page(
            "pages/entities.py",
            title="Entities & records",
            icon=":material/table_chart:",
            url_path="records",
        ),
    ],
    "Audience and sending": [
        st.Page(
            "pages/contacts.py",
            title="Contacts",
            icon=":material/contacts:",
            url_path="contacts",
        ),
        st.Page(
            "pages/emailings.py",
            title="Emailings",
            icon=":material/outgoing_mail:",
            url_path="emailings",
        ),
        st.Page(
            "pages/emailing_detail.py",
            title="Emailing",
            url_path="emailing",
            visibility="hidden",
        ),
    ],
    "Reports": [
        st.Page(
            "pages/statistics.py",
            title="Statistics",
            icon=":material/monitoring:",
            url_path="statistics",
        ),
        st.Page(
            "pages/activity.py",
            title="Activity",
            icon=":material/history:",
            url_path="activity",
        ),
    ],
    "System": [
        st.Page(
            "pages/settings.py",
            title="Settings",
            icon=":material/settings:",
            url_path="settings",
        ),
    ],
}

page = st.navigation(PAGES)
ui.show_flash()
page.run()
