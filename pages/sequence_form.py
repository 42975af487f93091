"""Create or edit one sequence, and preview it on a record (the dry run).

The form follows the product's documentation, top to bottom: trigger, action,
conditions, reference, the target entity's fields, then Active and Save. Every
widget keeps its value in session state under a ``seq_`` key, so fields that
appear as choices are made keep what was typed, and Save can put each domain
error under the widget it belongs to.
"""

from __future__ import annotations

import itertools

import pandas as pd
import streamlit as st

from pages import ui
from sequencer import dryrun, entities, records, sequences, templating
from sequencer.conditions import OPERATOR_LABELS
from sequencer.enums import Match, Operator, PropertyType, RecordAction
from sequencer.exceptions import SequencerError, ValidationError
from sequencer.system import CONTACT_LIST, EMAILING, SENDER

LIST_PAGE = "pages/sequences.py"
STATE_PREFIX = "seq_"
ERRORS = ui.FieldErrors("seq_errors")
OPERATORS = OPERATOR_LABELS
NO_VALUE = {Operator.IS_EMPTY, Operator.IS_NOT_EMPTY, Operator.CHANGED}
LONG_FIELDS = {"message", "html"}
BOOLEAN_CHOICES = {"": "(not set)", "true": "Yes", "false": "No"}
ACTION_LABELS = {action.value: action.value.capitalize() for action in RecordAction}
EMAILING_STATUSES = {
    "": "(not set: pending)",
    "pending": "pending (scheduled)",
    "draft": "draft (not sent)",
}
_row_ids = itertools.count()


def _reset_form() -> None:
    """Forget every value of the form (Cancel, Save, or another sequence)."""
    for key in [k for k in st.session_state if k.startswith(STATE_PREFIX)]:
        del st.session_state[key]


def _load(sequence_id: int | None) -> None:
    """Fill the form's state once, from the stored sequence when editing."""
    form_for = f"edit-{sequence_id}" if sequence_id else "new"
    # Streamlit drops a widget's value once a run does not draw it, so a
    # missing name means the user went to another page and came back.
    same_form = st.session_state.get("seq_form_for") == form_for
    if same_form and "seq_name" in st.session_state:
        return
    _reset_form()
    st.session_state["seq_form_for"] = form_for
    st.session_state["seq_conditions"] = []
    st.session_state["seq_active"] = True
    st.session_state["seq_match"] = Match.ALL.value
    if sequence_id is None:
        return

    with ui.session() as session:
        stored = sequences.SequenceIn.from_model(
            session, sequences.get_sequence(session, sequence_id)
        )
    state = st.session_state
    state["seq_name"] = stored.name
    state["seq_active"] = stored.active
    state["seq_trigger_entity"] = stored.trigger_entity
    state["seq_watched_property"] = stored.watched_property
    state["seq_trigger_action"] = RecordAction(stored.trigger_action).value
    state["seq_target_entity"] = stored.target_entity
    state["seq_target_action"] = RecordAction(stored.target_action).value
    state["seq_match"] = Match(stored.match).value
    state["seq_reference"] = stored.reference or ""
    for condition in stored.conditions:
        row = _add_condition()
        state[f"seq_cond_property_{row}"] = condition.get("property")
        state[f"seq_cond_operator_{row}"] = Operator(condition.get("operator")).value
        value = condition.get("value")
        if isinstance(value, list):
            value = ", ".join(str(item) for item in value)
        state[f"seq_cond_value_{row}"] = "" if value is None else str(value)
    for name, template in stored.fields.items():
        state[f"seq_field_{name}"] = "" if template is None else str(template)


def _add_condition() -> int:
    row = next(_row_ids)
    while row in st.session_state["seq_conditions"]:
        row = next(_row_ids)
    st.session_state["seq_conditions"].append(row)
    return row


def _remove_condition(row: int) -> None:
    st.session_state["seq_conditions"].remove(row)


def _conditions() -> list[dict]:
    """The condition rows as the domain reads them, in screen order."""
    rules = []
    for row in st.session_state["seq_conditions"]:
        operator = st.session_state.get(f"seq_cond_operator_{row}")
        rule = {
            "property": st.session_state.get(f"seq_cond_property_{row}"),
            "operator": operator,
        }
        if operator not in NO_VALUE:
            rule["value"] = st.session_state.get(f"seq_cond_value_{row}", "")
        rules.append(rule)
    return rules


def _fields(target_properties: list) -> dict[str, str]:
    """The non-empty field templates typed for the target entity."""
    fields = {}
    for prop in target_properties:
        value = st.session_state.get(f"seq_field_{prop.name}")
        if prop.read_only or value is None or str(value).strip() == "":
            continue
        fields[prop.name] = str(value)
    return fields


def _sequence_in(target_properties: list) -> sequences.SequenceIn:
    """What the form says, as the domain's input object."""
    state = st.session_state
    return sequences.SequenceIn(
        name=state.get("seq_name", "").strip(),
        active=bool(state.get("seq_active", True)),
        trigger_entity=state.get("seq_trigger_entity"),
        trigger_action=state.get("seq_trigger_action"),
        watched_property=state.get("seq_watched_property") or None,
        conditions=_conditions(),
        match=state.get("seq_match", Match.ALL.value),
        target_entity=state.get("seq_target_entity"),
        target_action=state.get("seq_target_action"),
        fields=_fields(target_properties),
        reference=(state.get("seq_reference") or "").strip() or None,
    )


def _field_widget(prop, *, creating: bool, hints: dict[str, str]) -> None:
    """One target field: a template box, or a fixed choice where one fits."""
    key = f"seq_field_{prop.name}"
    label = prop.label + (" *" if prop.required and creating else "")
    if prop.read_only:
        st.text_input(
            label,
            value="maintained by the system",
            disabled=True,
            key=f"seq_readonly_{prop.name}",
        )
        return
    if prop.name == "status" and st.session_state.get("seq_target_entity") == EMAILING:
        st.selectbox(
            label,
            list(EMAILING_STATUSES),
            format_func=EMAILING_STATUSES.get,
            key=key,
        )
    elif prop.type == PropertyType.BOOLEAN:
        st.selectbox(
            label, list(BOOLEAN_CHOICES), format_func=BOOLEAN_CHOICES.get, key=key
        )
    elif prop.name in LONG_FIELDS:
        st.text_area(label, key=key, height=160 if prop.name == "html" else 100)
    else:
        placeholder = hints.get(prop.name, "") if prop.name == "send_at" else ""
        st.text_input(label, key=key, placeholder=placeholder)
    if prop.name in hints and prop.name != "send_at":
        st.caption(hints[prop.name])
    ERRORS.show(prop.name)


def _emailing_hints(session) -> dict[str, str]:
    """What to type in the Emailing fields that take ids or times."""
    senders = records.list_records(session, SENDER)
    lists = records.list_records(session, CONTACT_LIST)
    sender_text = ", ".join(
        f"{row.id} = {row['name']} <{row['email']}>" for _, row in senders.iterrows()
    )
    list_text = ", ".join(f"{row.id} = {row['name']}" for _, row in lists.iterrows())
    return {
        "sender": f"Sender id. Known senders: {sender_text or 'none yet'}.",
        "contact_list": "List ids such as [3] or [3, 7]; templates allowed. "
        f"Known lists: {list_text or 'none yet'}.",
        "tag_filter": 'Tags such as ["vip"]: recipients with any of them.',
        "send_at": f"now, +30m, +2h, +3d, {{created_at}} +1d, or a date-time "
        f"in {ui.zone()} such as 2026-12-24 09:00",
    }


def _preview(target_properties: list) -> None:
    """Run the sequence as typed on one record, writing nothing."""
    trigger = st.session_state.get("seq_trigger_entity")
    if not trigger:
        st.info("Choose the trigger entity to preview the sequence on a record.")
        return
    with ui.session() as session:
        candidates = records.list_records(session, trigger, limit=200)
    if candidates.empty:
        st.info("The trigger entity has no record to preview on yet.")
        return
    labels = {
        int(row["id"]): f"#{row['id']} {row.get('name', '') or ''}".strip()
        for _, row in candidates.iterrows()
    }
    record_id = st.selectbox(
        "Record", list(labels), format_func=labels.get, key="seq_preview_record"
    )
    if not st.button(
        "Run the preview", icon=":material/play_arrow:", key="seq_preview_run"
    ):
        return
    try:
        with ui.session() as session:
            result = dryrun.dry_run(session, _sequence_in(target_properties), record_id)
    except SequencerError as exc:
        st.error(str(exc))
        return

    if result.would_run:
        st.success("The conditions hold: the action would run with these fields.")
    else:
        st.warning("The conditions do not hold: nothing would run.")
    for message in result.errors:
        st.error(message)
    if result.conditions:
        st.dataframe(pd.DataFrame(result.conditions), hide_index=True)
    rendered = dict(result.fields)
    html_body = rendered.pop("html", None)
    if rendered:
        st.dataframe(
            pd.DataFrame(
                {"field": list(rendered), "value": [str(v) for v in rendered.values()]}
            ),
            hide_index=True,
        )
    if html_body:
        st.markdown("**Html**")
        ui.email_frame(str(html_body))


# --- Sections of the form ------------------------------------------------------


def _trigger_section(entity_labels: dict[str, str]) -> tuple[list, list[str]]:
    """Entity, then (once chosen) the watched property, then the action.

    Returns the trigger entity's properties and template variables.
    """
    st.subheader("Trigger", anchor=False)
    _pick_entity(entity_labels, "trigger", "Choose the entity to watch")
    properties: list = []
    variables: list[str] = []
    trigger_name = st.session_state.get("seq_trigger_entity")
    if trigger_name:
        with ui.session() as session:
            properties = entities.properties_of(session, trigger_name)
            variables = entities.variables_of(session, trigger_name)
        labels = {prop.name: prop.label for prop in properties}
        st.selectbox(
            "Property",
            list(labels),
            index=None,
            format_func=labels.get,
            placeholder="Any property (optional)",
            help="Only a change of this property fires an update.",
            key="seq_watched_property",
        )
        ERRORS.show("watched_property")
    _pick_action("trigger")
    return properties, variables


def _action_section(entity_labels: dict[str, str]) -> None:
    """The entity the sequence creates or updates, and which of the two."""
    st.subheader("Action", anchor=False)
    _pick_entity(entity_labels, "target", "Choose the entity to create or update")
    _pick_action("target")


def _pick_entity(entity_labels: dict[str, str], side: str, placeholder: str) -> None:
    """The entity select box of the trigger or the target, with its error."""
    st.selectbox(
        "Entity",
        list(entity_labels),
        index=None,
        format_func=entity_labels.get,
        placeholder=placeholder,
        key=f"seq_{side}_entity",
    )
    ERRORS.show(f"{side}_entity")


def _pick_action(side: str) -> None:
    """Create or Update, for the trigger or the target, with its error."""
    st.selectbox(
        "Action",
        list(ACTION_LABELS),
        index=None,
        format_func=ACTION_LABELS.get,
        placeholder="Create or Update",
        key=f"seq_{side}_action",
    )
    ERRORS.show(f"{side}_action")


def _conditions_section(trigger_properties: list) -> None:
    """Rows of property, operator and value; all or any of them must hold."""
    st.subheader("Conditions", anchor=False)
    choices = ["id", "created_at", "updated_at"]
    choices += [prop.name for prop in trigger_properties]
    if len(st.session_state["seq_conditions"]) > 1:
        st.radio(
            "Match",
            [Match.ALL.value, Match.ANY.value],
            format_func={"all": "all conditions", "any": "any condition"}.get,
            horizontal=True,
            key="seq_match",
        )
    for number, row in enumerate(st.session_state["seq_conditions"], start=1):
        prop_col, op_col, value_col, remove_col = st.columns(
            [3, 2, 3, 1], vertical_alignment="bottom"
        )
        prop_col.selectbox(
            f"Property {number}",
            choices,
            index=None,
            placeholder="Property",
            key=f"seq_cond_property_{row}",
        )
        op_col.selectbox(
            f"Operator {number}",
            list(OPERATORS),
            format_func=OPERATORS.get,
            key=f"seq_cond_operator_{row}",
        )
        if st.session_state.get(f"seq_cond_operator_{row}") not in NO_VALUE:
            value_col.text_input(
                f"Value {number}",
                key=f"seq_cond_value_{row}",
                help="For 'is one of', separate the values with commas.",
            )
        remove_col.button(
            "✕",
            key=f"seq_cond_remove_{row}",
            help="Remove this condition",
            on_click=_remove_condition,
            args=(row,),
        )
        ERRORS.show(f"condition_{number}")
    st.button("Add condition +", on_click=_add_condition, key="seq_add_condition")
    ERRORS.show("conditions")


def _target_fields(entity_labels: dict[str, str]) -> list:
    """The target entity's fields, once its entity and action are chosen."""
    target_name = st.session_state.get("seq_target_entity")
    target_action = st.session_state.get("seq_target_action")
    if not (target_name and target_action):
        st.caption("Choose the action's entity and action to fill in its fields.")
        return []
    with ui.session() as session:
        properties = entities.properties_of(session, target_name)
        hints = _emailing_hints(session) if target_name == EMAILING else {}
    st.subheader(f"{entity_labels[target_name]} fields", anchor=False)
    creating = target_action == RecordAction.CREATE.value
    # The Emailing's own reference is what the Reference field above fills in.
    properties = [prop for prop in properties if prop.name != "reference"]
    for prop in properties:
        _field_widget(prop, creating=creating, hints=hints)
    return properties


def _save(sequence_id: int | None, target_properties: list) -> None:
    """Validate and save; errors go under their fields, success to the list."""
    ERRORS.clear()
    try:
        with st.spinner("Saving…"), ui.session() as session:
            saved = sequences.save_sequence(
                session, _sequence_in(target_properties), sequence_id=sequence_id
            )
    except ValidationError as exc:
        ERRORS.add(exc)
        st.rerun()
    except SequencerError as exc:
        st.error(str(exc))
        return
    ui.flash(f"Sequence '{saved.sequence.name}' saved")
    for warning in saved.warnings:
        ui.flash(warning, icon=":material/warning:", duration="long")
    _reset_form()
    st.switch_page(LIST_PAGE)


def _variables_panel(variables: list[str]) -> None:
    """What the templates may use: the trigger's variables, then the recipient's."""
    st.subheader("Variables available", anchor=False)
    if variables:
        st.markdown("\n".join(f"- `{{{name}}}`" for name in variables))
    else:
        st.caption("Choose the trigger entity to see its variables.")
    st.markdown("**Recipient variables** (filled per recipient when sending)")
    st.markdown("\n".join(f"- `{{{name}}}`" for name in templating.RECIPIENT_VARIABLES))
    st.caption("Full Jinja2 works too: `{{ name | upper }}`, `{% if %}`.")


# --- The page ------------------------------------------------------------------

raw_id = st.query_params.get("id")
sequence_id = int(raw_id) if raw_id and raw_id.isdigit() else None
try:
    _load(sequence_id)
except SequencerError as exc:
    st.error(str(exc))
    st.page_link(LIST_PAGE, label="Back to the sequences", icon=":material/arrow_back:")
    st.stop()

st.title("Edit the sequence" if sequence_id else "Create a sequence")
with ui.session() as session:
    entity_labels = {e.name: e.label for e in entities.list_entities(session)}

form, side = st.columns([3, 1], gap="large")
with form:
    st.text_input("Name *", key="seq_name", placeholder="e.g. Stock bas")
    ERRORS.show("name")
    trigger_properties, variables = _trigger_section(entity_labels)
    _action_section(entity_labels)
    _conditions_section(trigger_properties)
    st.text_input(
        "Reference",
        key="seq_reference",
        placeholder="e.g. {client_id}; empty: the source record",
        help="On Create, stored on the new record (by default the source "
        "record, such as produits/57). On Update, selects the records to change.",
    )
    ERRORS.show("reference")
    target_properties = _target_fields(entity_labels)
    st.checkbox("Active", key="seq_active")

    # Errors for fields that have no widget here (such as match) go last.
    rows = len(st.session_state["seq_conditions"])
    known = {"name", "trigger_entity", "watched_property", "trigger_action"}
    known |= {"target_entity", "target_action", "reference", "conditions"}
    known |= {f"condition_{number}" for number in range(1, rows + 1)}
    known |= {prop.name for prop in target_properties}
    ERRORS.show_unplaced(known)

    cancel, save, _ = st.columns([1, 1, 4])
    if cancel.button("Cancel", key="seq_cancel"):
        _reset_form()
        st.switch_page(LIST_PAGE)
    if save.button("Save", type="primary", key="seq_save"):
        _save(sequence_id, target_properties)

with side:
    _variables_panel(variables)

st.divider()
with st.expander("Preview on a record", expanded=st.query_params.get("preview") == "1"):
    _preview(target_properties)
