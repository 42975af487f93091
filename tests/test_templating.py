"""Field templates: shorthand variables, sandboxed Jinja, and the recipient pass."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sequencer.exceptions import TemplateError
from sequencer.templating import (
    check_template,
    render,
    render_for_recipient,
    to_jinja,
)

CONTEXT = {"name": "Café <bio> & co", "quantite": 9.0, "id": 57}


def show(template: str, *, html: bool = False, context: dict | None = None) -> str:
    values = CONTEXT if context is None else context
    return render(template, values, html=html, subject="sequence 's'", field="subject")


def test_shorthand_variables_become_jinja_outside_tags() -> None:
    source = to_jinja("Hi {name} {{ id }} {% if id %}{quantite}{% endif %}")
    assert source == "Hi {{ name }} {{ id }} {% if id %}{{ quantite }}{% endif %}"


def test_css_braces_are_left_alone() -> None:
    html = "<style>p{color:red} .a { margin: 0 }</style><p>{name}</p>"
    assert show(html, html=True) == (
        "<style>p{color:red} .a { margin: 0 }</style><p>Café &lt;bio&gt; &amp; co</p>"
    )


def test_html_escapes_record_values_but_not_the_template() -> None:
    assert show("<b>{name}</b>", html=True) == "<b>Café &lt;bio&gt; &amp; co</b>"
    assert show("<b>{name}</b>") == "<b>Café <bio> & co</b>"


def test_numbers_print_without_a_trailing_zero() -> None:
    assert show("Il reste {quantite}") == "Il reste 9"


def test_full_jinja_works_with_filters_and_tags() -> None:
    template = "{{ name | upper }}{% if quantite < 10 %} bas{% endif %}"
    assert show(template) == "CAFÉ <BIO> & CO bas"


def test_datetimes_print_in_the_user_zone() -> None:
    moment = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    assert show("{updated_at}", context={"updated_at": moment}) == "2026-12-03 10:00"


def test_attribute_tricks_are_refused_at_save_and_at_render() -> None:
    with pytest.raises(TemplateError, match="'__class__' is refused"):
        check_template("{name.__class__}", ["name"], subject="s", field="subject")
    with pytest.raises(TemplateError, match="unsafe"):
        show("{name.__class__}")


def test_unknown_variable_is_refused_listing_those_available() -> None:
    with pytest.raises(TemplateError, match=r"unknown variable \{nom\}; available: "
                       r"\{name\}, \{quantite\}, \{contact.email\}"):  # fmt: skip
        check_template("Stock {nom}", ["name", "quantite"], subject="s", field="x")


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(TemplateError, match="subject: line 1"):
        check_template("{% if %}", ["name"], subject="s", field="subject")


def test_recipient_variables_survive_the_first_pass() -> None:
    template = "Bonjour {contact.name} {{ contact.email }} <a href='{unsubscribe_url}'>"
    assert show(template, html=True) == (
        "Bonjour {contact.name} {contact.email} <a href='{unsubscribe_url}'>"
    )
    check_template(template, ["name"], subject="s", field="html")


def test_recipient_pass_fills_and_escapes_per_contact() -> None:
    text = render_for_recipient(
        "Bonjour {contact.name} ({contact.ville}{contact.absent}) {unsubscribe_url}",
        contact={"email": "a@example.com", "name": "Zoé <Z>", "ville": "Lyon"},
        unsubscribe_url="https://t.example.com/u?a=1&b=2",
        html=True,
    )
    assert text == "Bonjour Zoé &lt;Z&gt; (Lyon) https://t.example.com/u?a=1&amp;b=2"


def test_recipient_pass_never_runs_record_text_as_a_template() -> None:
    text = render_for_recipient(
        "{{ 7 * 7 }} {contact.name}",
        contact={"name": "{{ 6 * 6 }}"},
        unsubscribe_url="",
        html=False,
    )
    assert text == "{{ 7 * 7 }} {{ 6 * 6 }}"


def test_plain_templates_render_like_jinja() -> None:
    context = {"name": "<x>", "n": 2.0, "d": datetime(2026, 1, 1, tzinfo=UTC)}
    for html in (False, True):
        fast = show("a {name} b {n} {d}", html=html, context=context)
        slow = show(
            "a {name} b {n} {d}{% if 1 %}{% endif %}", html=html, context=context
        )
        assert fast == slow


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 10**10 }}",
        "{{ name * 999999999 }}",
        "{{ [1] * 10**9 }}",
        "{{ 2 ** 10000000 }}",
        "{{ id ** 99999999 }}",
    ],
)
def test_huge_products_and_powers_are_refused_not_computed(template: str) -> None:
    check_template(template, ["name", "id"], subject="s", field="subject")

    with pytest.raises(TemplateError, match="subject: refused: the (product|power)"):
        show(template)


def test_small_products_and_powers_still_render() -> None:
    assert show("{{ '-' * 3 }} {{ 2 ** 10 }} {{ quantite * 2 }}") == "--- 1024 18"


@pytest.mark.parametrize(
    "template",
    [
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}"
        "{% endfor %}",
        "{% for i in range(100000) %}{{ range(100000)|join(',') }}{% endfor %}",
    ],
    ids=["nested", "joined"],
)
def test_loops_that_would_run_away_are_refused(template: str) -> None:
    with pytest.raises(TemplateError, match="subject: refused: the loops would run"):
        show(template)


def test_loops_within_the_budget_render_each_time() -> None:
    template = "{% for i in range(3) %}{{ i }}{% endfor %}"

    assert [show(template) for _ in range(40_000)][-1] == "012"
