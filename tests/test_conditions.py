"""Conditions compare typed values; bad values are refused when saved."""

from __future__ import annotations

import pytest

from sequencer.conditions import Condition, build, evaluate
from sequencer.entities import EntityInfo, PropertyInfo
from sequencer.enums import PropertyType as T
from sequencer.exceptions import ValidationError

PRODUITS = EntityInfo(
    id=1,
    name="produits",
    label="Produits",
    system=False,
    name_property=None,
    properties={
        name: PropertyInfo(name, name, kind, False, False)
        for name, kind in [
            ("name", T.TEXT),
            ("quantite", T.NUMBER),
            ("livraison", T.DATE),
            ("tags", T.LIST),
            ("email", T.EMAIL),
            ("actif", T.BOOLEAN),
        ]
    },
)


def rule(prop: str, operator: str, value: object = None, index: int = 1) -> Condition:
    spec = {"property": prop, "operator": operator, "value": value}
    return build(spec, PRODUITS, subject="sequence 'Stock bas'", index=index)


def holds(condition: Condition, new: dict, old: dict | None = None) -> bool:
    return evaluate(condition, old, new)


def test_numbers_compare_numerically_even_when_stored_as_text() -> None:
    assert not holds(rule("quantite", "gt", "100"), {"quantite": "9"})
    assert holds(rule("quantite", "lt", "10"), {"quantite": "9"})
    assert holds(rule("quantite", "lt", "10,5"), {"quantite": 10})


@pytest.mark.parametrize(
    ("operator", "value", "stored", "expected"),
    [("equals", "9", 9.0, True), ("not_equals", "9", 8, True), ("lte", "9", 9, True),
     ("gte", "9", 8, False), ("<", "9", 8, True), (">", "9", 8, False)],
)  # fmt: skip
def test_ordering_operators(
    operator: str, value: str, stored: object, expected: bool
) -> None:
    assert holds(rule("quantite", operator, value), {"quantite": stored}) is expected


def test_text_operators() -> None:
    new = {"name": "Café Bio"}
    assert holds(rule("name", "contains", "bio"), new)
    assert holds(rule("name", "does not contain", "thé"), new)
    assert holds(rule("name", "starts_with", "café"), new)
    assert holds(rule("name", "is_one_of", "Thé, Café Bio"), new)
    assert not holds(rule("name", "is_one_of", "Thé, Café"), new)


def test_empty_operators() -> None:
    assert holds(rule("name", "is_empty"), {"name": "  "})
    assert holds(rule("name", "is_not_empty"), {"name": "x"})
    assert not holds(rule("quantite", "lt", "10"), {"quantite": None})


def test_list_contains_an_item() -> None:
    assert holds(rule("tags", "contains", "vip"), {"tags": ["VIP", "b2b"]})
    assert holds(rule("tags", "not_contains", "bio"), {"tags": ["vip"]})


def test_emails_compare_case_insensitively() -> None:
    assert holds(
        rule("email", "equals", "Jean@Example.com"), {"email": "jean@example.com"}
    )


def test_dates_and_booleans_compare_typed() -> None:
    assert holds(rule("livraison", "lt", "01/01/2027"), {"livraison": "2026-12-31"})
    assert holds(rule("actif", "equals", "oui"), {"actif": True})


def test_changed_operators_compare_old_and_new() -> None:
    old, new = {"quantite": 120}, {"quantite": 9}
    assert holds(rule("quantite", "changed"), new, old)
    assert not holds(rule("quantite", "changed"), {"quantite": "120"}, old)
    assert holds(rule("quantite", "changed_from", "120"), new, old)
    assert not holds(rule("quantite", "changed_from", "100"), new, old)
    assert holds(rule("quantite", "changed_to", "9"), new, old)


def test_unreadable_value_names_sequence_condition_and_value() -> None:
    with pytest.raises(
        ValidationError,
        match="sequence 'Stock bas': condition 2: value 'abc' is not a number",
    ):
        rule("quantite", "lt", "abc", index=2)


def test_unknown_property_and_operator_are_refused() -> None:
    with pytest.raises(ValidationError, match="condition 1: produits has no property"):
        rule("stock", "lt", "3")
    with pytest.raises(ValidationError, match="operator 'about' is not one of"):
        rule("quantite", "about", "3")


def test_ordering_a_text_property_is_refused() -> None:
    with pytest.raises(ValidationError, match="cannot be compared"):
        rule("name", "lt", "b")


def test_missing_value_is_refused() -> None:
    with pytest.raises(ValidationError, match="a value is required"):
        rule("quantite", "equals", "")
