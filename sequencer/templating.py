"""Field templates: ``{name}`` shorthand over sandboxed Jinja2.

A sequence writes each target field as a template over the trigger record. The
common case is a single-brace variable (``Stock bas : {name}``); full Jinja2
(``{{ }}``, ``{% %}``, filters) works for those who need it. Templates run in
Jinja2's sandbox, so attribute tricks such as ``{name.__class__}`` are refused.

Rendering happens twice for an emailing: once when the sequence runs (record
variables), and once per recipient at send time (``{contact.name}``,
``{unsubscribe_url}``), which the first pass leaves exactly as written.
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment, safe_range
from markupsafe import Markup, escape

from sequencer.exceptions import TemplateError
from sequencer.types import format_value

RECIPIENT_VARIABLES = [
    "contact.email",
    "contact.name",
    "contact.<attribute>",
    "unsubscribe_url",
]
"""Filled per recipient at send time, not when the sequence runs."""

_JINJA_BLOCK = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
_SHORTHAND = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*\}")
_RECIPIENT = re.compile(r"\{\s*(?:contact\.([A-Za-z0-9_]+)|(unsubscribe_url))\s*\}")
_RECIPIENT_NAMES = {"contact", "unsubscribe_url"}


def _is_recipient(path: str) -> bool:
    return path == "unsubscribe_url" or path.startswith("contact.")


def to_jinja(template: str) -> str:
    """Turn ``{var}`` into ``{{ var }}`` outside Jinja tags.

    Only a brace pair around a dotted name is a variable, so CSS such as
    ``p{color:red}`` stays as written; recipient variables stay single-brace
    for the send-time pass.
    """
    pieces: list[str] = []
    position = 0
    for block in _JINJA_BLOCK.finditer(template):
        pieces.append(_convert_text(template[position : block.start()]))
        pieces.append(block.group(0))
        position = block.end()
    pieces.append(_convert_text(template[position:]))
    return "".join(pieces)


def _convert_text(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        path = match.group(1)
        if _is_recipient(path):
            return match.group(0)
        return "{{ " + path + " }}"

    return _SHORTHAND.sub(replace, text)


def _finalize(value: Any) -> Any:
    """How a value prints: ``12`` not ``12.0``, times in the user's zone."""
    if isinstance(value, Markup) or isinstance(value, str):
        return value
    return format_value(None, value)


class _RecipientPlaceholder:
    """Stands for ``contact`` in ``{{ contact.name }}``: prints ``{contact.name}``."""

    def __getattr__(self, name: str) -> Markup:
        if name.startswith("_"):
            raise AttributeError(name)
        return Markup("{contact.%s}") % Markup(name)


MAX_PRODUCT = 100_000
"""Characters or items a ``*`` may build; a ``**`` result is capped likewise."""
MAX_LOOP_ITEMS = 100_000
"""Items every ``range()`` of one rendering may yield, all loops together."""

_loop_budget: ContextVar[list[int] | None] = ContextVar("loop_budget", default=None)


def _budgeted_range(*args: int) -> range:
    """``range`` drawing on the rendering's budget: nested loops cannot run away.

    The sandbox caps one range at 100,000 items, but a range inside a loop
    over another may still run ten billion times and hold the scheduler's
    pass (sequences run before sending) for hours.
    """
    items = safe_range(*args)
    budget = _loop_budget.get()
    if budget is not None:
        budget[0] -= len(items)
        if budget[0] < 0:
            raise SecurityError(
                f"the loops would run more than {MAX_LOOP_ITEMS} times in all"
            )
    return items


_MAX_POWER_BITS = 4_000


class _Sandbox(SandboxedEnvironment):
    """Jinja2's sandbox, plus bounds on ``*`` and ``**``.

    The plain sandbox lets ``{{ 'x' * 10**10 }}`` or ``{{ 9**9**9**9 }}`` run,
    and folds such constants while compiling, so one saved template could
    exhaust the memory of whoever checks or renders it.
    """

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sized, count in ((left, right), (right, left)):
                if (
                    isinstance(sized, str | list | tuple)
                    and isinstance(count, int)
                    and len(sized) * count > MAX_PRODUCT
                ):
                    raise SecurityError(
                        f"the product would be longer than {MAX_PRODUCT}"
                    )
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right > 0
            and left.bit_length() * right > _MAX_POWER_BITS
        ):
            raise SecurityError("the power is too large")
        return super().call_binop(context, operator, left, right)


def _environment(autoescape: bool) -> SandboxedEnvironment:
    environment = _Sandbox(
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
    )
    environment.globals["range"] = _budgeted_range
    return environment


_TEXT_ENV = _environment(False)
_HTML_ENV = _environment(True)


@lru_cache(maxsize=2048)
def _compiled(source: str, html: bool) -> jinja2.Template:
    return (_HTML_ENV if html else _TEXT_ENV).from_string(source)


def _listing(available: Iterable[str]) -> str:
    names = [f"{{{name}}}" for name in available]
    names += [f"{{{name}}}" for name in RECIPIENT_VARIABLES]
    return ", ".join(names)


def _syntax_error(
    exc: jinja2.TemplateSyntaxError, subject: str, field: str
) -> TemplateError:
    return TemplateError(subject, field, f"line {exc.lineno}: {exc.message}")


def check_template(
    template: str | None,
    available: Iterable[str],
    *,
    subject: str,
    field: str,
) -> None:
    """Refuse a template that cannot render on every record of the entity.

    :raises TemplateError: for a syntax error, an unknown variable (listing the
        available ones) or an attribute starting with ``_``.
    """
    if not template:
        return
    available = list(available)
    source = to_jinja(template)
    try:
        tree = _TEXT_ENV.parse(source)
        _compiled(source, False)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc, subject, field) from None
    except jinja2.TemplateError as exc:
        raise TemplateError(subject, field, str(exc)) from None
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        attribute = node.attr if isinstance(node, nodes.Getattr) else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            attribute = str(node.arg.value)
        if attribute is not None and attribute.startswith("_"):
            raise TemplateError(
                subject, field, f"'{attribute}' is refused: private attributes"
            )
    unknown = sorted(
        meta.find_undeclared_variables(tree)
        - set(available)
        - _RECIPIENT_NAMES
        - set(_TEXT_ENV.globals)
    )
    if unknown:
        listed = ", ".join(f"{{{name}}}" for name in unknown)
        raise TemplateError(
            subject,
            field,
            f"unknown variable {listed}; available: {_listing(available)}",
        )


_PLAIN_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@lru_cache(maxsize=2048)
def _plain_parts(template: str) -> tuple[str | tuple[str], ...] | None:
    """Text and bare variables only: rendered by substitution, as Jinja would.

    Most field templates are ``Stock bas : {name}``; skipping Jinja's context
    machinery for them makes a cascade over an import several times faster.
    Anything else (tags, filters, attributes, carriage returns) returns None.
    """
    source = to_jinja(template)
    if "{%" in source or "{#" in source or "\r" in source:
        return None
    parts: list[str | tuple[str]] = []
    position = 0
    for match in _PLAIN_VARIABLE.finditer(source):
        parts.append(source[position : match.start()])
        parts.append((match.group(1),))
        position = match.end()
    parts.append(source[position:])
    texts = [part for part in parts if isinstance(part, str)]
    if any("{{" in text or "}}" in text for text in texts):
        return None
    return tuple(part for part in parts if part != "")


def _show(value: Any, html: bool) -> str:
    text = _finalize(value)
    return str(escape(text)) if html else str(text)


def render(
    template: str | None,
    context: Mapping[str, Any],
    *,
    html: bool,
    subject: str,
    field: str,
) -> str:
    """Render a field template over a record's values (first pass).

    With ``html`` the record values are HTML-escaped; the template's own markup
    is not. Recipient variables come out unchanged.

    :raises TemplateError: naming ``subject`` and ``field``.
    """
    if not template:
        return ""
    if "{" not in template:
        return template
    parts = _plain_parts(template)
    if parts is not None and all(
        isinstance(part, str) or part[0] in context for part in parts
    ):
        return "".join(
            part if isinstance(part, str) else _show(context[part[0]], html)
            for part in parts
        )
    source = to_jinja(template)
    values = {
        "contact": _RecipientPlaceholder(),
        "unsubscribe_url": "{unsubscribe_url}",
    }
    values.update(context)
    budget = _loop_budget.set([MAX_LOOP_ITEMS])
    try:
        return _compiled(source, html).render(values)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc, subject, field) from None
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(subject, field, f"refused: {exc}") from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(
            subject, field, f"{exc}; available: {_listing(context)}"
        ) from None
    except jinja2.TemplateError as exc:
        raise TemplateError(subject, field, str(exc)) from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise TemplateError(subject, field, f"cannot render: {exc}") from None
    except (MemoryError, RecursionError) as exc:
        what = "out of memory" if isinstance(exc, MemoryError) else "too deep"
        raise TemplateError(subject, field, f"cannot render: {what}") from None
    finally:
        _loop_budget.reset(budget)


def render_for_recipient(
    template: str,
    *,
    contact: Mapping[str, Any],
    unsubscribe_url: str,
    html: bool,
) -> str:
    """Fill the recipient variables of an already rendered emailing field.

    ``contact`` holds ``email``, ``name`` and the contact's attributes; an
    attribute the contact lacks prints as nothing. With ``html`` the values are
    escaped. This is plain substitution, never Jinja: text that came from a
    record cannot run as a template here.
    """
    if "{" not in template:
        return template

    def replace(match: re.Match[str]) -> str:
        attribute, is_unsubscribe = match.groups()
        value = unsubscribe_url if is_unsubscribe else contact.get(attribute)
        text = format_value(None, value)
        return html_lib.escape(text, quote=True) if html else text

    return _RECIPIENT.sub(replace, template)
