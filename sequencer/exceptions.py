"""Every error Sequencer raises on purpose.

Each message names the object and the field at fault, so the dashboard can show
it next to the field and the CLI can print it as it is.
"""

from __future__ import annotations


class SequencerError(Exception):
    """Base class: an error whose message is fit to show a user."""


class ValidationError(SequencerError, ValueError):
    """A value does not fit its field.

    :param subject: what was being validated, e.g. ``sequence 'Stock bas'``
    :param field: the field at fault, e.g. ``condition 2`` or ``subject``
    :param reason: what is wrong with it
    """

    def __init__(self, subject: str, field: str | None, reason: str) -> None:
        self.subject = subject
        self.field = field
        self.reason = reason
        where = f"{subject}: {field}" if field else subject
        super().__init__(f"{where}: {reason}")


class TemplateError(ValidationError):
    """A template cannot be parsed or rendered (unknown variable, unsafe access)."""


class NotFoundError(SequencerError, LookupError):
    """An entity, record or other object named by id or name does not exist."""

    def __init__(self, kind: str, key: object) -> None:
        self.kind = kind
        self.key = key
        super().__init__(f"{kind} {key!r} does not exist")


class ImportFileError(SequencerError):
    """A whole import file cannot be read (encoding, header, format)."""


class SendError(SequencerError):
    """An emailing or a test message cannot be sent; the reason is in the message."""
