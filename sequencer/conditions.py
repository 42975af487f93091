"""Sequence conditions: typed comparisons of a record's old and new values.

A rule is ``{"property": "quantite", "operator": "lt", "value": "10"}``. The
value is read with the property's type when the sequence is saved (so ``abc``
for a number is refused then, naming the condition) and again when it runs, so
a number stored as the text ``"9"`` still compares as 9.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sequencer.entities import EntityInfo
from sequencer.enums import Operator, PropertyType
from sequencer.exceptions import ValidationError
from sequencer.types import from_json, is_empty, parse_value, values_equal

NO_VALUE = {Operator.IS_EMPTY, Operator.IS_NOT_EMPTY, Operator.CHANGED}
CHANGES = {Operator.CHANGED, Operator.CHANGED_FROM, Operator.CHANGED_TO}
ORDERED = {Operator.LT, Operator.LTE, Operator.GT, Operator.GTE}
ORDERED_TYPES = {
    PropertyType.NUMBER,
    PropertyType.INTEGER,
    PropertyType.DATE,
    PropertyType.DATETIME,
}
TEXT_ONLY = {Operator.STARTS_WITH}
BUILTIN_TYPES = {
    "id": PropertyType.INTEGER,
    "created_at": PropertyType.DATETIME,
    "updated_at": PropertyType.DATETIME,
}
OPERATOR_LABELS = {
    Operator.EQUALS: "equals",
    Operator.NOT_EQUALS: "does not equal",
    Operator.LT: "<",
    Operator.LTE: "<=",
    Operator.GT: ">",
    Operator.GTE: ">=",
    Operator.CONTAINS: "contains",
    Operator.NOT_CONTAINS: "does not contain",
    Operator.STARTS_WITH: "starts with",
    Operator.IS_EMPTY: "is empty",
    Operator.IS_NOT_EMPTY: "is not empty",
    Operator.IS_ONE_OF: "is one of",
    Operator.CHANGED: "changed",
    Operator.CHANGED_FROM: "changed from",
    Operator.CHANGED_TO: "changed to",
}
_ALIASES = {
    "=": Operator.EQUALS,
    "==": Operator.EQUALS,
    "!=": Operator.NOT_EQUALS,
    "<>": Operator.NOT_EQUALS,
    "<": Operator.LT,
    "<=": Operator.LTE,
    ">": Operator.GT,
    ">=": Operator.GTE,
} | {label: operator for operator, label in OPERATOR_LABELS.items()}


@dataclass(frozen=True)
class Condition:
    """One rule, checked against an entity: its property's type is known."""

    property: str
    operator: Operator
    value: Any
    type: PropertyType
    expected: Any = None
    """The value read with the property's type, unless it depends on the time."""
    relative: bool = False
    """True for values such as ``now`` or ``-7d`` that are read at each run."""

    def describe(self) -> str:
        """The rule as a sentence: ``quantite < 10``."""
        return _sentence(self.property, self.operator, str(self.value))


@lru_cache(maxsize=1024)
def _sentence(name: str, operator: Operator, value: str) -> str:
    label = OPERATOR_LABELS[operator]
    return f"{name} {label}" if operator in NO_VALUE else f"{name} {label} {value}"


def read_operator(raw: Any) -> Operator:
    """An operator from its value (``lt``), its symbol (``<``) or its label."""
    text = str(raw or "").strip().lower()
    if text in _ALIASES:
        return _ALIASES[text]
    return Operator(text.replace(" ", "_"))


def property_type(info: EntityInfo, name: str) -> PropertyType | None:
    """The type of a property or built-in field of the entity, if it has one."""
    if name in info.properties:
        return info.properties[name].type
    return BUILTIN_TYPES.get(name)


def build(
    rule: dict[str, Any], info: EntityInfo, *, subject: str, index: int
) -> Condition:
    """Check one rule against the trigger entity.

    :raises ValidationError: ``condition <index>`` with what is wrong, e.g.
        ``value 'abc' is not a number``.
    """
    field = f"condition {index}"
    if not isinstance(rule, dict):
        raise ValidationError(
            subject,
            field,
            f"must be an object with property, operator and value, not {rule!r}",
        )
    name = str(rule.get("property") or "").strip()
    kind = property_type(info, name)
    if kind is None:
        known = ", ".join([*BUILTIN_TYPES, *info.properties])
        raise ValidationError(
            subject, field, f"{info.name} has no property {name!r} (known: {known})"
        )
    try:
        operator = read_operator(rule.get("operator"))
    except ValueError:
        choices = ", ".join(member.value for member in Operator)
        raise ValidationError(
            subject, field, f"operator {rule.get('operator')!r} is not one of {choices}"
        ) from None
    if operator in ORDERED and kind not in ORDERED_TYPES:
        raise ValidationError(
            subject, field, f"{name} is {kind.value}: it cannot be compared with <, >"
        )
    if operator in TEXT_ONLY and kind not in (PropertyType.TEXT, PropertyType.EMAIL):
        raise ValidationError(subject, field, f"{name} is {kind.value}, not text")
    raw = rule.get("value")
    if operator in NO_VALUE:
        return Condition(name, operator, None, kind)
    if is_empty(raw):
        raise ValidationError(subject, field, "a value is required")
    expected = _read(kind, operator, raw, subject=subject, field=field, now=None)
    relative = kind is PropertyType.DATETIME and not _absolute_text(raw)
    return Condition(name, operator, raw, kind, expected, relative)


def _absolute_text(raw: Any) -> bool:
    """Whether a date-time value reads the same at any time (no ``now``, no offset)."""
    text = str(raw).strip().lower()
    return text != "now" and not re.search(r"[+-]\s*\d+\s*[mhdw]\b", text)


def _read(
    kind: PropertyType,
    operator: Operator,
    raw: Any,
    *,
    subject: str,
    field: str,
    now: datetime | None,
) -> Any:
    """The rule's value with the property's type (a list for ``is one of``)."""
    if operator is Operator.IS_ONE_OF:
        items = raw if isinstance(raw, list) else re.split(r"[,;\n]", str(raw))
        return [
            parse_value(
                kind,
                item.strip() if isinstance(item, str) else item,
                subject=subject,
                field=field,
                now=now,
            )
            for item in items
            if not is_empty(item)
        ]
    if kind is PropertyType.LIST and operator in (
        Operator.CONTAINS,
        Operator.NOT_CONTAINS,
    ):
        items = parse_value(kind, [raw], subject=subject, field=field)
        return items[0] if items else None
    if kind is PropertyType.LIST or operator not in (
        Operator.CONTAINS,
        Operator.NOT_CONTAINS,
    ):
        return parse_value(kind, raw, subject=subject, field=field, now=now)
    return str(raw)


def evaluate(
    condition: Condition,
    old: dict[str, Any] | None,
    new: dict[str, Any],
    *,
    now: datetime | None = None,
) -> bool:
    """Whether the rule holds for a record going from ``old`` to ``new``.

    ``old`` is None for a created record, whose every value counts as changed
    from empty.
    """
    kind, operator = condition.type, condition.operator
    after = from_json(kind, new.get(condition.property))
    if operator is Operator.IS_EMPTY:
        return is_empty(after)
    if operator is Operator.IS_NOT_EMPTY:
        return not is_empty(after)
    expected = condition.expected
    if condition.relative:
        expected = _read(
            kind, operator, condition.value, subject="condition", field="value", now=now
        )
    if operator not in CHANGES:
        return _compare(kind, operator, after, expected)
    before = from_json(kind, (old or {}).get(condition.property))
    changed = not values_equal(kind, before, after)
    if operator is Operator.CHANGED:
        return changed
    if operator is Operator.CHANGED_FROM:
        return changed and values_equal(kind, before, expected)
    if operator is Operator.CHANGED_TO:
        return changed and values_equal(kind, after, expected)
    return _compare(kind, operator, after, expected)


def _compare(kind: PropertyType, operator: Operator, value: Any, expected: Any) -> bool:
    if operator is Operator.EQUALS:
        return values_equal(kind, value, expected)
    if operator is Operator.NOT_EQUALS:
        return not values_equal(kind, value, expected)
    if operator is Operator.IS_ONE_OF:
        return any(values_equal(kind, value, item) for item in expected)
    if operator in (Operator.CONTAINS, Operator.NOT_CONTAINS):
        found = _contains(kind, value, expected)
        return found if operator is Operator.CONTAINS else not found
    if operator is Operator.STARTS_WITH:
        return str(value or "").lower().startswith(str(expected).lower())
    if is_empty(value):
        return False
    try:
        if operator is Operator.LT:
            return bool(value < expected)
        if operator is Operator.LTE:
            return bool(value <= expected)
        if operator is Operator.GT:
            return bool(value > expected)
        return bool(value >= expected)
    except TypeError:
        return False


def _contains(kind: PropertyType, value: Any, expected: Any) -> bool:
    if kind is PropertyType.LIST:
        return any(str(item).lower() == str(expected).lower() for item in value or [])
    if is_empty(value):
        return False
    return str(expected).lower() in str(value).lower()
