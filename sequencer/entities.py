"""The entity registry: custom entities, their typed properties, and lookups.

Records, sequences, templates and the CSV import all ask "which properties does
this entity have, and of which type"; ``describe`` answers from a small cache
kept on the session, so an import of ten thousand rows reads the registry once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlmodel import Session

from sequencer.enums import PropertyType
from sequencer.exceptions import NotFoundError, ValidationError
from sequencer.models import (
    Entity,
    EntityGroupMember,
    Event,
    Property,
    Record,
    Sequence,
    SequenceRun,
)

logger = logging.getLogger(__name__)

BUILTIN_VARIABLES = ["id", "name", "created_at", "updated_at", "update_at"]
"""Variables every record has; ``update_at`` is an alias of ``updated_at``."""
RESERVED_NAMES = {"id", "created_at", "updated_at", "update_at", "reference"}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CACHE_KEY = "sequencer.entities"


@dataclass(frozen=True)
class PropertyInfo:
    """A property as the rest of the domain reads it (not bound to a session)."""

    name: str
    label: str
    type: PropertyType
    required: bool
    read_only: bool


@dataclass(frozen=True)
class EntityInfo:
    """An entity and its properties, in their display order."""

    id: int
    name: str
    label: str
    system: bool
    name_property: str | None
    properties: dict[str, PropertyInfo]

    @property
    def subject(self) -> str:
        """How error messages name the entity."""
        return self.name

    def property(self, name: str) -> PropertyInfo:
        """The property called ``name``, or a ValidationError naming the choices."""
        try:
            return self.properties[name]
        except KeyError:
            known = ", ".join(self.properties) or "none"
            raise ValidationError(
                self.name, name, f"no such property (properties: {known})"
            ) from None


def get_entity(session: Session, key: str | int | Entity) -> Entity:
    """The entity with this id, name or label.

    :raises NotFoundError: when none matches.
    """
    if isinstance(key, Entity):
        return key
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise NotFoundError("entity", key)
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        entity = session.get(Entity, int(key))
    else:
        text = key.strip()
        entity = session.scalars(select(Entity).where(Entity.name == text)).first()
        if entity is None:
            for candidate in session.scalars(select(Entity)):
                if candidate.label.lower() == text.lower():
                    entity = candidate
                    break
    if entity is None:
        raise NotFoundError("entity", key)
    return entity


def describe(session: Session, key: str | int | Entity | EntityInfo) -> EntityInfo:
    """The entity and its properties, read once per session."""
    if isinstance(key, EntityInfo):
        return key
    cache: dict[Any, EntityInfo] = session.info.setdefault(_CACHE_KEY, {})
    lookup = key.id if isinstance(key, Entity) else key
    if lookup in cache:
        return cache[lookup]
    entity = get_entity(session, key)
    rows = session.scalars(
        select(Property)
        .where(Property.entity_id == entity.id)
        .order_by(Property.position, Property.id)
    )
    info = EntityInfo(
        id=entity.id,
        name=entity.name,
        label=entity.label,
        system=entity.system,
        name_property=entity.name_property,
        properties={
            row.name: PropertyInfo(
                row.name, row.label, PropertyType(row.type), row.required, row.read_only
            )
            for row in rows
        },
    )
    for alias in (entity.id, entity.name, lookup):
        cache[alias] = info
    return info


def forget(session: Session) -> None:
    """Drop the session's registry cache after a change to entities."""
    session.info.pop(_CACHE_KEY, None)


def list_entities(session: Session, *, include_system: bool = True) -> list[Entity]:
    """Every entity, custom ones by label first, then the system ones."""
    query = select(Entity).order_by(Entity.system, Entity.label)
    if not include_system:
        query = query.where(Entity.system.is_(False))
    return list(session.scalars(query))


def properties_of(session: Session, entity: str | int | Entity) -> list[Property]:
    """The properties of an entity in display order."""
    entity = get_entity(session, entity)
    query = (
        select(Property)
        .where(Property.entity_id == entity.id)
        .order_by(Property.position, Property.id)
    )
    return list(session.scalars(query))


def variables_of(
    session: Session, entity: str | int | Entity | EntityInfo
) -> list[str]:
    """The template variables of a record: the built-in ones, then each property."""
    info = describe(session, entity)
    names = list(BUILTIN_VARIABLES)
    names += [name for name in info.properties if name not in names]
    return names


def _check_name(subject: str, name: Any) -> str:
    text = str(name or "").strip()
    if not _NAME.match(text):
        raise ValidationError(
            subject,
            "name",
            f"{text!r} must start with a lowercase letter and hold only "
            "lowercase letters, digits and _",
        )
    return text


def _property_row(
    subject: str, entity_id: int, spec: dict[str, Any], position: int
) -> Property:
    name = _check_name(subject, spec.get("name"))
    if name in RESERVED_NAMES:
        raise ValidationError(subject, name, "this name is reserved for every record")
    try:
        kind = PropertyType(str(spec.get("type") or "text").lower())
    except ValueError:
        choices = ", ".join(member.value for member in PropertyType)
        raise ValidationError(
            subject, name, f"type {spec.get('type')!r} is not one of {choices}"
        ) from None
    from sequencer.types import parse_value

    # "false" written as text is no: bool("false") would make it required.
    required = parse_value(
        PropertyType.BOOLEAN,
        spec.get("required"),
        subject=subject,
        field=f"{name}.required",
    )
    return Property(
        entity_id=entity_id,
        name=name,
        label=str(spec.get("label") or name.replace("_", " ").capitalize()),
        type=kind,
        required=bool(required),
        position=position,
    )


def check_label(
    session: Session, subject: str, label: str, entity_id: int | None = None
) -> str:
    """Refuse a label another entity has (as its label or its name).

    Entities are found by name or label (the CLI's ``import Clients``, a
    configuration document); two with one label could not be told apart.
    """
    text = label.strip()
    for other in session.scalars(select(Entity)):
        if other.id == entity_id:
            continue
        if text.lower() in (other.label.strip().lower(), other.name):
            raise ValidationError(
                subject, "label", f"{text!r} is already entity '{other.name}'"
            )
    return text


def create_entity(
    session: Session,
    *,
    name: str,
    label: str | None = None,
    properties: list[dict[str, Any]] | None = None,
    name_property: str | None = None,
    commit: bool = True,
) -> Entity:
    """Define a custom entity with its properties (name, label, type, required).

    :param name_property: the property ``{name}`` stands for in templates
        (by default ``name`` if there is one, else the first text property).

    :raises ValidationError: for a bad or taken name, or a bad property.
    """
    name = _check_name("entity", name)
    subject = f"entity '{name}'"
    if session.scalars(select(Entity).where(Entity.name == name)).first():
        raise ValidationError(subject, "name", "an entity with this name exists")
    entity_label = check_label(session, subject, label or name.capitalize())
    entity = Entity(name=name, label=entity_label)
    session.add(entity)
    session.flush()
    seen: set[str] = set()
    for position, spec in enumerate(properties or []):
        row = _property_row(subject, entity.id, spec, position)
        if row.name in seen:
            raise ValidationError(subject, row.name, "property defined twice")
        seen.add(row.name)
        session.add(row)
    if name_property:
        if name_property not in seen:
            raise ValidationError(
                subject, "name_property", f"no property {name_property!r}"
            )
        entity.name_property = name_property
    session.flush()
    forget(session)
    if commit:
        session.commit()
    logger.info("created entity %s (id %s)", name, entity.id)
    return entity


def add_property(
    session: Session,
    entity: str | int | Entity,
    *,
    name: str,
    label: str | None = None,
    type: PropertyType | str = PropertyType.TEXT,
    required: bool = False,
    commit: bool = True,
) -> Property:
    """Add a property to a custom entity."""
    entity = get_entity(session, entity)
    subject = f"entity '{entity.name}'"
    if entity.system:
        raise ValidationError(subject, name, "system entities cannot be changed")
    existing = properties_of(session, entity)
    if any(prop.name == name for prop in existing):
        raise ValidationError(subject, name, "a property with this name exists")
    spec = {"name": name, "label": label, "type": type, "required": required}
    row = _property_row(subject, entity.id, spec, len(existing))
    if row.required:
        _refuse_if_missing(session, entity, name)
    session.add(row)
    session.flush()
    forget(session)
    if commit:
        session.commit()
    logger.info("added property %s to entity %s", name, entity.id)
    return row


def update_property(
    session: Session,
    entity: str | int | Entity,
    name: str,
    *,
    label: str | None = None,
    type: PropertyType | str | None = None,
    required: bool | None = None,
    commit: bool = True,
) -> Property:
    """Change a custom property's label, type or required flag.

    Stored values are kept as they are; they are read with the new type when
    used, so a text column turned number compares numerically at once.
    """
    entity = get_entity(session, entity)
    subject = f"entity '{entity.name}'"
    if entity.system:
        raise ValidationError(subject, name, "system entities cannot be changed")
    row = next((p for p in properties_of(session, entity) if p.name == name), None)
    if row is None:
        raise NotFoundError("property", f"{entity.name}.{name}")
    if label is not None:
        row.label = label.strip() or row.label
    if type is not None:
        row.type = _property_row(
            subject, entity.id, {"name": name, "type": type}, 0
        ).type
    if required is not None:
        if required and not row.required:
            _refuse_if_missing(session, entity, name)
        row.required = required
    session.add(row)
    session.flush()
    forget(session)
    if commit:
        session.commit()
    logger.info("updated property %s of entity %s", name, entity.id)
    return row


def delete_property(
    session: Session, entity: str | int | Entity, name: str, *, commit: bool = True
) -> None:
    """Remove a custom property; values already stored under it stay unread."""
    entity = get_entity(session, entity)
    if entity.system:
        raise ValidationError(f"entity '{entity.name}'", name, "system entity")
    _refuse_if_used(session, entity, name)
    session.execute(
        delete(Property).where(Property.entity_id == entity.id, Property.name == name)
    )
    forget(session)
    if commit:
        session.commit()
    logger.info("deleted property %s of entity %s", name, entity.id)


def _refuse_if_missing(session: Session, entity: Entity, name: str) -> None:
    """Refuse to require a value that records already stored do not have.

    Each of them could no longer be saved, by hand or by import, until that
    value is filled in.
    """
    from sequencer.types import is_empty

    stored = session.scalars(select(Record.data).where(Record.entity_id == entity.id))
    missing = sum(1 for data in stored if is_empty((data or {}).get(name)))
    if missing:
        raise ValidationError(
            f"entity '{entity.name}'",
            name,
            f"cannot be required: {missing} stored records have no value; fill "
            "them in first",
        )


def _refuse_if_used(session: Session, entity: Entity, prop: str | None) -> None:
    """Refuse to remove what a sequence still relies on, naming the sequence."""
    for sequence in session.scalars(select(Sequence)):
        uses_entity = entity.id in (
            sequence.trigger_entity_id,
            sequence.target_entity_id,
        )
        if not uses_entity:
            continue
        if prop is None:
            raise ValidationError(
                f"entity '{entity.name}'",
                None,
                f"sequence '{sequence.name}' uses it; delete the sequence first",
            )
        used = prop == sequence.watched_property or any(
            rule.get("property") == prop for rule in sequence.conditions
        )
        if sequence.target_entity_id == entity.id:
            used = used or prop in sequence.fields
        if used:
            raise ValidationError(
                f"entity '{entity.name}'",
                prop,
                f"sequence '{sequence.name}' uses it; change the sequence first",
            )


def delete_entity(
    session: Session, entity: str | int | Entity, *, commit: bool = True
) -> None:
    """Delete a custom entity with its records and their history.

    :raises ValidationError: for a system entity or one a sequence uses.
    """
    entity = get_entity(session, entity)
    if entity.system:
        raise ValidationError(f"entity '{entity.name}'", None, "system entity")
    _refuse_if_used(session, entity, None)
    events = select(Event.id).where(Event.entity_id == entity.id)
    session.execute(delete(SequenceRun).where(SequenceRun.event_id.in_(events)))
    session.execute(delete(Event).where(Event.entity_id == entity.id))
    session.execute(delete(Record).where(Record.entity_id == entity.id))
    session.execute(
        delete(EntityGroupMember).where(EntityGroupMember.entity_id == entity.id)
    )
    session.execute(delete(Property).where(Property.entity_id == entity.id))
    entity_id = entity.id
    session.delete(entity)
    session.flush()
    forget(session)
    if commit:
        session.commit()
    logger.info("deleted entity %s", entity_id)
