"""Configuration as code: entities, groups, senders, lists and sequences in JSON.

``export_config`` writes one document; ``import_config`` reads it back into
any database. Import validates everything before it writes and commits all or
nothing; importing the same document twice changes nothing. Objects are
matched by name (senders by email), never by database id, so a document moves
between databases. Emailing fields that name a sender or contact lists by id
are rewritten to the ids of the receiving database.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from sequencer import engine, entities, groups, sequences
from sequencer.entities import describe
from sequencer.enums import PropertyType
from sequencer.exceptions import ImportFileError, SequencerError, ValidationError
from sequencer.models import (
    ContactList,
    Entity,
    EntityGroup,
    Property,
    Sender,
    Sequence,
)
from sequencer.system import EMAILING
from sequencer.timeutil import utcnow
from sequencer.types import parse_value

logger = logging.getLogger(__name__)

FORMAT = "sequencer-config"
VERSION = 1


@dataclass
class ConfigReport:
    """What an import created, changed and left as it was, by kind."""

    created: dict[str, int] = field(default_factory=dict)
    updated: dict[str, int] = field(default_factory=dict)
    unchanged: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def count(self, bucket: str, kind: str) -> None:
        target = getattr(self, bucket)
        target[kind] = target.get(kind, 0) + 1

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated)

    def summary(self) -> str:
        def listed(counts: dict[str, int]) -> str:
            return ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "nothing"

        return (
            f"created {listed(self.created)}; updated {listed(self.updated)}; "
            f"unchanged {listed(self.unchanged)}"
        )


def export_config(session: Session) -> dict[str, Any]:
    """The whole configuration as a JSON-ready document."""
    custom = entities.list_entities(session, include_system=False)
    document: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "entities": [
            {
                "name": entity.name,
                "label": entity.label,
                "name_property": entity.name_property,
                "properties": [
                    {
                        "name": prop.name,
                        "label": prop.label,
                        "type": PropertyType(prop.type).value,
                        "required": prop.required,
                    }
                    for prop in entities.properties_of(session, entity)
                ],
            }
            for entity in custom
        ],
        "entity_groups": [
            {"name": group["name"], "entities": group["entities"]}
            for group in groups.list_groups(session)
        ],
        "senders": [
            {
                "id": sender.id,
                "name": sender.name,
                "email": sender.email,
                "reply_to": sender.reply_to,
            }
            for sender in session.scalars(select(Sender).order_by(Sender.id))
        ],
        "contact_lists": [
            {"id": item.id, "name": item.name, "description": item.description}
            for item in session.scalars(select(ContactList).order_by(ContactList.id))
        ],
        "sequences": [
            _sequence_document(session, sequence)
            for sequence in session.scalars(select(Sequence).order_by(Sequence.name))
        ],
    }
    return document


def _sequence_document(session: Session, sequence: Sequence) -> dict[str, Any]:
    data = sequences.SequenceIn.from_model(session, sequence)
    return {
        "name": data.name,
        "active": data.active,
        "trigger": {
            "entity": data.trigger_entity,
            "action": str(data.trigger_action),
            "watch": data.watched_property,
        },
        "conditions": data.conditions,
        "match": str(data.match),
        "action": {
            "entity": data.target_entity,
            "action": str(data.target_action),
            "fields": data.fields,
            "reference": data.reference,
        },
    }


def write_config(session: Session, path: str | Path | None = None) -> str:
    """The configuration as indented JSON, also written to ``path`` if given."""
    text = json.dumps(export_config(session), indent=2, ensure_ascii=False) + "\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def _load(document: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(document, dict):
        return document
    try:
        text = Path(document).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ImportFileError(f"cannot read {document}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ImportFileError(
            f"{document} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from None
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportFileError(
            f"{document} is not valid JSON: line {exc.lineno}: {exc.msg}"
        ) from None
    if not isinstance(loaded, dict):
        raise ImportFileError(f"{document} must hold a JSON object")
    return loaded


def import_config(
    session: Session, document: dict[str, Any] | str | Path
) -> ConfigReport:
    """Create or update everything the document describes, all or nothing.

    :raises ImportFileError: for a file that is not a configuration document.
    :raises ValidationError: naming the object and field at fault; nothing is
        written.
    """
    data = _load(document)
    if data.get("format") != FORMAT:
        raise ImportFileError(f"not a Sequencer configuration (format {FORMAT!r})")
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int | str):
        raise ImportFileError(f"version must be a whole number, not {version!r}")
    try:
        number = int(version)
    except ValueError:
        raise ImportFileError(
            f"version must be a whole number, not {version!r}"
        ) from None
    if number > VERSION:
        raise ImportFileError(f"version {version} is newer than {VERSION}")
    _check_shape(data)
    report = ConfigReport()
    try:
        _apply(session, data, report)
        session.commit()
    except BaseException:
        session.rollback()
        entities.forget(session)
        engine.forget_sequences(session)
        raise
    logger.info("imported configuration: %s", report.summary())
    return report


def _items(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = data.get(key) or []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValidationError("configuration", key, "must be a list of objects")
    return items


def _subject(kind: str, spec: dict[str, Any], index: int, key: str = "name") -> str:
    name = spec.get(key)
    return f"{kind} '{name}'" if name else f"{kind} {index}"


def _need(subject: str, spec: dict[str, Any], key: str, kind: type) -> None:
    value = spec.get(key)
    if value is not None and not isinstance(value, kind):
        wanted = {dict: "an object", list: "a list"}.get(kind, "text")
        raise ValidationError(subject, key, f"must be {wanted}, not {value!r}")


def _check_id(subject: str, spec: dict[str, Any]) -> None:
    value = spec.get("id")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationError(subject, "id", f"must be a whole number, not {value!r}")
    try:
        int(value)
    except ValueError:
        raise ValidationError(
            subject, "id", f"must be a whole number, not {value!r}"
        ) from None


def _check_unique(kind: str, key: str, specs: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for spec in specs:
        value = str(spec.get(key) or "").strip()
        if key == "email":
            value = value.lower()
        if value and value in seen:
            raise ValidationError(
                f"{kind} '{value}'", key, "appears twice in the document"
            )
        seen.add(value)


def _check_shape(data: dict[str, Any]) -> None:
    """Refuse a document whose objects are not shaped as the format says.

    :raises ValidationError: naming the object and the key at fault.
    """
    for index, spec in enumerate(_items(data, "entities"), start=1):
        subject = _subject("entity", spec, index)
        _need(subject, spec, "properties", list)
        _need(subject, spec, "label", str)
        _need(subject, spec, "name_property", str)
        for prop in spec.get("properties") or []:
            if not isinstance(prop, dict):
                raise ValidationError(
                    subject, "properties", f"must be objects, not {prop!r}"
                )
            _need(subject, prop, "label", str)
            _need(subject, prop, "type", str)
    for kind, key, specs in (
        ("entity", "name", _items(data, "entities")),
        ("sender", "email", _items(data, "senders")),
        ("contact list", "name", _items(data, "contact_lists")),
        ("entity group", "name", _items(data, "entity_groups")),
        ("sequence", "name", _items(data, "sequences")),
    ):
        _check_unique(kind, key, specs)
    for kind, key, specs in (
        ("sender", "email", _items(data, "senders")),
        ("contact list", "name", _items(data, "contact_lists")),
    ):
        ids: dict[int, str] = {}
        for index, spec in enumerate(specs, start=1):
            subject = _subject(kind, spec, index, key)
            _check_id(subject, spec)
            if spec.get("id") is None:
                continue
            number = int(spec["id"])
            if number in ids:
                # Fields that name this id could not tell which one they mean.
                raise ValidationError(
                    subject, "id", f"{number} is also the id of {ids[number]}"
                )
            ids[number] = subject
    for index, spec in enumerate(_items(data, "entity_groups"), start=1):
        _need(_subject("entity group", spec, index), spec, "entities", list)
    for index, spec in enumerate(_items(data, "sequences"), start=1):
        subject = _subject("sequence", spec, index)
        _need(subject, spec, "trigger", dict)
        _need(subject, spec, "action", dict)
        _need(subject, spec, "conditions", list)
        for rule in spec.get("conditions") or []:
            if not isinstance(rule, dict):
                raise ValidationError(
                    subject, "conditions", f"must be objects, not {rule!r}"
                )
        _need(subject, spec.get("action") or {}, "fields", dict)


def _apply(session: Session, data: dict[str, Any], report: ConfigReport) -> None:
    for spec in _items(data, "entities"):
        _import_entity(session, spec, report)
    sender_ids = {}
    for spec in _items(data, "senders"):
        sender = _import_sender(session, spec, report)
        if spec.get("id") is not None:
            sender_ids[int(spec["id"])] = sender.id
    list_ids = {}
    for spec in _items(data, "contact_lists"):
        item = _import_list(session, spec, report)
        if spec.get("id") is not None:
            list_ids[int(spec["id"])] = item.id
    for spec in _items(data, "entity_groups"):
        _import_group(session, spec, report)
    session.flush()
    entities.forget(session)
    for spec in _items(data, "sequences"):
        _import_sequence(session, spec, sender_ids, list_ids, report)


def _import_entity(
    session: Session, spec: dict[str, Any], report: ConfigReport
) -> None:
    name = str(spec.get("name") or "")
    existing = session.scalars(select(Entity).where(Entity.name == name)).first()
    properties = spec.get("properties") or []
    if existing is None:
        entities.create_entity(
            session,
            name=name,
            label=spec.get("label"),
            properties=properties,
            name_property=spec.get("name_property"),
            commit=False,
        )
        report.count("created", "entities")
        return
    subject = f"entity '{name}'"
    if existing.system:
        raise ValidationError(subject, None, "system entities are built in")
    changed = False
    label = spec.get("label") or existing.label
    name_property = spec.get("name_property") or None
    known = {prop.name for prop in entities.properties_of(session, existing)}
    known |= {str(prop.get("name") or "") for prop in properties}
    if name_property is not None and name_property not in known:
        raise ValidationError(
            subject, "name_property", f"no property {name_property!r}"
        )
    if label != existing.label:
        label = entities.check_label(session, subject, label, existing.id)
    if (label, name_property) != (existing.label, existing.name_property):
        existing.label, existing.name_property = label, name_property
        existing.updated_at = utcnow()
        session.add(existing)
        changed = True
    current = {prop.name: prop for prop in entities.properties_of(session, existing)}
    for prop_spec in properties:
        prop_name = str(prop_spec.get("name") or "")
        prop = current.get(prop_name)
        if prop is None:
            entities.add_property(
                session,
                existing,
                name=prop_name,
                label=prop_spec.get("label"),
                type=prop_spec.get("type") or "text",
                required=_flag(subject, prop_spec, "required", False),
                commit=False,
            )
            changed = True
        elif _property_differs(subject, prop, prop_spec):
            entities.update_property(
                session,
                existing,
                prop_name,
                label=prop_spec.get("label"),
                type=prop_spec.get("type"),
                required=_flag(subject, prop_spec, "required", False),
                commit=False,
            )
            changed = True
    report.count("updated" if changed else "unchanged", "entities")


def _flag(subject: str, spec: dict[str, Any], key: str, default: bool) -> bool:
    """A yes/no value; ``"false"`` is no, not a non-empty (so true) text."""
    value = parse_value(PropertyType.BOOLEAN, spec.get(key), subject=subject, field=key)
    return default if value is None else value


def _property_differs(subject: str, prop: Property, spec: dict[str, Any]) -> bool:
    return (
        (spec.get("label") and spec["label"] != prop.label)
        or str(spec.get("type") or "text").lower() != PropertyType(prop.type).value
        or _flag(subject, spec, "required", False) != prop.required
    )


def _clean_email(subject: str, name: str, raw: Any, *, required: bool) -> str | None:
    value = parse_value(PropertyType.EMAIL, raw, subject=subject, field=name)
    if value is None and required:
        raise ValidationError(subject, name, "required")
    return value


def _import_sender(
    session: Session, spec: dict[str, Any], report: ConfigReport
) -> Sender:
    name = str(spec.get("name") or "").strip()
    subject = f"sender '{name or spec.get('email')}'"
    if not name:
        raise ValidationError(subject, "name", "required")
    email = _clean_email(subject, "email", spec.get("email"), required=True)
    reply_to = _clean_email(subject, "reply_to", spec.get("reply_to"), required=False)
    sender = session.scalars(select(Sender).where(Sender.email == email)).first()
    if sender is None:
        sender = Sender(name=name, email=email, reply_to=reply_to)
        session.add(sender)
        session.flush()
        report.count("created", "senders")
    elif (sender.name, sender.reply_to) != (name, reply_to):
        sender.name, sender.reply_to, sender.updated_at = name, reply_to, utcnow()
        session.add(sender)
        report.count("updated", "senders")
    else:
        report.count("unchanged", "senders")
    return sender


def _import_list(
    session: Session, spec: dict[str, Any], report: ConfigReport
) -> ContactList:
    name = str(spec.get("name") or "").strip()
    if not name:
        raise ValidationError("contact list", "name", "required")
    description = str(spec.get("description") or "")
    item = session.scalars(select(ContactList).where(ContactList.name == name)).first()
    if item is None:
        item = ContactList(name=name, description=description)
        session.add(item)
        session.flush()
        report.count("created", "contact lists")
    elif item.description != description:
        item.description, item.updated_at = description, utcnow()
        session.add(item)
        report.count("updated", "contact lists")
    else:
        report.count("unchanged", "contact lists")
    return item


def _import_group(session: Session, spec: dict[str, Any], report: ConfigReport) -> None:
    name = str(spec.get("name") or "").strip()
    wanted = []
    for key in spec.get("entities") or []:
        try:
            wanted.append(entities.get_entity(session, key).id)
        except SequencerError:
            raise ValidationError(
                f"entity group '{name}'", "entities", f"no entity {key!r}"
            ) from None
    group = session.scalars(select(EntityGroup).where(EntityGroup.name == name)).first()
    if group is None:
        groups.create_group(session, name, wanted, commit=False)
        report.count("created", "entity groups")
    elif sorted(groups.group_entities(session, group.id)) != sorted(set(wanted)):
        groups.set_group_entities(session, group.id, wanted, commit=False)
        report.count("updated", "entity groups")
    else:
        report.count("unchanged", "entity groups")


def _remap(template: str, mapping: dict[int, int], many: bool) -> str:
    """Rewrite a constant sender or list id from the exporting database."""
    text = template.strip()
    if not mapping or "{" in text:
        return template
    try:
        value = parse_value(
            PropertyType.LIST if many else PropertyType.INTEGER,
            text,
            subject="",
            field="",
        )
    except ValidationError:
        return template
    if many:
        return json.dumps([mapping.get(item, item) for item in value])
    return str(mapping.get(value, value))


def _import_sequence(
    session: Session,
    spec: dict[str, Any],
    sender_ids: dict[int, int],
    list_ids: dict[int, int],
    report: ConfigReport,
) -> None:
    name = str(spec.get("name") or "").strip()
    trigger = spec.get("trigger") or {}
    action = spec.get("action") or {}
    fields = {
        str(k): str(v) for k, v in (action.get("fields") or {}).items() if v is not None
    }
    target = str(action.get("entity") or EMAILING)
    if describe_name(session, target) == EMAILING:
        if "sender" in fields:
            fields["sender"] = _remap(fields["sender"], sender_ids, many=False)
        if "contact_list" in fields:
            fields["contact_list"] = _remap(fields["contact_list"], list_ids, many=True)
    data = sequences.SequenceIn(
        name=name,
        trigger_entity=str(trigger.get("entity") or ""),
        trigger_action=str(trigger.get("action") or "update"),
        watched_property=trigger.get("watch"),
        conditions=list(spec.get("conditions") or []),
        match=str(spec.get("match") or "all"),
        target_entity=target,
        target_action=str(action.get("action") or "create"),
        fields=fields,
        reference=action.get("reference"),
        active=_flag(f"sequence '{name}'", spec, "active", True),
    )
    existing = session.scalars(select(Sequence).where(Sequence.name == name)).first()
    if existing is not None:
        built = sequences.to_model(session, data)
        if _same_sequence(existing, built):
            report.count("unchanged", "sequences")
            return
    result = sequences.save_sequence(
        session, data, sequence_id=existing.id if existing else None, commit=False
    )
    report.warnings += result.warnings
    report.count("updated" if existing else "created", "sequences")


def describe_name(session: Session, key: str) -> str:
    """The entity's name for a name or label, or the key itself if unknown."""
    try:
        return describe(session, key).name
    except SequencerError:
        return key


def _same_sequence(stored: Sequence, built: Sequence) -> bool:
    names = (
        "active", "trigger_entity_id", "trigger_action", "watched_property",
        "conditions", "match", "target_entity_id", "target_action", "fields",
        "reference",
    )  # fmt: skip
    return all(getattr(stored, name) == getattr(built, name) for name in names)
