"""Entity groups: named lists of entities that organise sequences and statistics."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import delete, select
from sqlmodel import Session

from sequencer.entities import get_entity
from sequencer.exceptions import NotFoundError, ValidationError
from sequencer.models import EntityGroup, EntityGroupMember
from sequencer.timeutil import utcnow

logger = logging.getLogger(__name__)


def _get(session: Session, group_id: int) -> EntityGroup:
    group = session.get(EntityGroup, group_id)
    if group is None:
        raise NotFoundError("entity group", group_id)
    return group


def _check_name(session: Session, name: str, group_id: int | None) -> str:
    name = (name or "").strip()
    if not name:
        raise ValidationError("entity group", "name", "required")
    clash = session.scalars(select(EntityGroup).where(EntityGroup.name == name)).first()
    if clash is not None and clash.id != group_id:
        raise ValidationError(f"entity group '{name}'", "name", "name already taken")
    return name


def create_group(
    session: Session,
    name: str,
    entity_ids: Iterable[int | str] = (),
    *,
    commit: bool = True,
) -> EntityGroup:
    """Create a group holding the given entities (ids or names)."""
    group = EntityGroup(name=_check_name(session, name, None))
    session.add(group)
    session.flush()
    set_group_entities(session, group.id, entity_ids, commit=False)
    if commit:
        session.commit()
    logger.info("created entity group %s (%s)", group.id, group.name)
    return group


def rename_group(
    session: Session, group_id: int, name: str, *, commit: bool = True
) -> EntityGroup:
    """Give a group a new, unique name."""
    group = _get(session, group_id)
    group.name = _check_name(session, name, group_id)
    group.updated_at = utcnow()
    session.add(group)
    if commit:
        session.commit()
    logger.info("renamed entity group %s to %s", group_id, group.name)
    return group


def set_group_entities(
    session: Session,
    group_id: int,
    entity_ids: Iterable[int | str],
    *,
    commit: bool = True,
) -> None:
    """Make the group hold exactly these entities."""
    group = _get(session, group_id)
    wanted = []
    for key in entity_ids:
        entity_id = get_entity(session, key).id
        if entity_id not in wanted:
            wanted.append(entity_id)
    session.execute(
        delete(EntityGroupMember).where(EntityGroupMember.group_id == group.id)
    )
    session.add_all(
        EntityGroupMember(group_id=group.id, entity_id=entity_id)
        for entity_id in wanted
    )
    group.updated_at = utcnow()
    session.add(group)
    session.flush()
    if commit:
        session.commit()
    logger.info("entity group %s holds entities %s", group_id, wanted)


def delete_group(session: Session, group_id: int, *, commit: bool = True) -> None:
    """Delete a group; its entities and sequences stay."""
    group = _get(session, group_id)
    session.execute(
        delete(EntityGroupMember).where(EntityGroupMember.group_id == group_id)
    )
    session.delete(group)
    if commit:
        session.commit()
    logger.info("deleted entity group %s", group_id)


def group_entities(session: Session, group_id: int) -> list[int]:
    """The ids of the entities in a group."""
    query = select(EntityGroupMember.entity_id).where(
        EntityGroupMember.group_id == group_id
    )
    return list(session.scalars(query))


def list_groups(session: Session) -> list[dict]:
    """Each group with the ids and names of its entities, by name."""
    from sequencer.models import Entity

    groups = list(session.scalars(select(EntityGroup).order_by(EntityGroup.name)))
    members: dict[int, list[tuple[int, str]]] = {}
    query = select(EntityGroupMember.group_id, Entity.id, Entity.name).join(
        Entity, Entity.id == EntityGroupMember.entity_id
    )
    for group_id, entity_id, entity_name in session.execute(query):
        members.setdefault(group_id, []).append((entity_id, entity_name))
    return [
        {
            "id": group.id,
            "name": group.name,
            "entity_ids": [entity_id for entity_id, _ in members.get(group.id, [])],
            "entities": [name for _, name in members.get(group.id, [])],
        }
        for group in groups
    ]
