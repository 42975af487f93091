"""The states and kinds that Sequencer's rows move through.

Each enum is stored by value (a short lowercase string) so the database stays
readable from a SQL prompt and the values survive a rename of the Python name.
"""

from __future__ import annotations

from enum import StrEnum


class PropertyType(StrEnum):
    """The type of an entity property: how values are parsed and compared."""

    TEXT = "text"
    """Free text; compared as strings."""
    NUMBER = "number"
    """A decimal number; "9" is read as 9 and compared numerically."""
    INTEGER = "integer"
    """A whole number."""
    BOOLEAN = "boolean"
    """True or false; accepts yes/no, 1/0, true/false, oui/non."""
    DATE = "date"
    """A calendar date with no time of day."""
    DATETIME = "datetime"
    """An instant; stored in UTC, shown in the user's time zone."""
    EMAIL = "email"
    """An email address; validated and compared case-insensitively."""
    LIST = "list"
    """A list of values, such as contact list ids or tags."""


class RecordAction(StrEnum):
    """What happened to a record; also what a trigger or an action does."""

    CREATE = "create"
    """A new record was created."""
    UPDATE = "update"
    """An existing record changed."""


class Match(StrEnum):
    """How a sequence combines its conditions."""

    ALL = "all"
    """Every condition must hold."""
    ANY = "any"
    """At least one condition must hold."""


class Operator(StrEnum):
    """A comparison a condition applies to a record's property."""

    EQUALS = "equals"
    NOT_EQUALS = "not_equals"
    LT = "lt"
    LTE = "lte"
    GT = "gt"
    GTE = "gte"
    CONTAINS = "contains"
    NOT_CONTAINS = "not_contains"
    STARTS_WITH = "starts_with"
    IS_EMPTY = "is_empty"
    IS_NOT_EMPTY = "is_not_empty"
    IS_ONE_OF = "is_one_of"
    CHANGED = "changed"
    """The property's value differs between the old and the new record."""
    CHANGED_FROM = "changed_from"
    """The property changed and its old value was the given one."""
    CHANGED_TO = "changed_to"
    """The property changed and its new value is the given one."""


class EventStatus(StrEnum):
    """Where a record event stands in the outbox."""

    PENDING = "pending"
    """Committed with its record write; sequences have not run on it yet."""
    PROCESSING = "processing"
    """Claimed by a worker; taken over if the claim goes stale."""
    PROCESSED = "processed"
    """Every matching sequence has a run row for it."""


class RunOutcome(StrEnum):
    """How one sequence run on one event ended."""

    DONE = "done"
    """Conditions held and the action wrote its records."""
    SKIPPED = "skipped"
    """Conditions did not hold, or an update action matched no record."""
    ERROR = "error"
    """The action failed; the message says why. The trigger write stands."""


class ContactStatus(StrEnum):
    """Whether a contact may receive emailings."""

    SUBSCRIBED = "subscribed"
    """Receives emailings."""
    UNSUBSCRIBED = "unsubscribed"
    """Asked to stop; excluded from every later send."""
    BOUNCED = "bounced"
    """A server refused the address permanently; excluded from later sends."""


class EmailingStatus(StrEnum):
    """The life of an emailing from creation to the last message."""

    DRAFT = "draft"
    """Saved without scheduling; the scheduler ignores it."""
    PENDING = "pending"
    """Scheduled; sent once its send-at time has passed."""
    SENDING = "sending"
    """Claimed by a worker; recipients are resolved and being sent."""
    SENT = "sent"
    """Every delivery reached a final state."""
    FAILED = "failed"
    """The emailing could not be sent at all (for example a missing sender)."""
    CANCELLED = "cancelled"
    """Stopped by a user; deliveries not yet sent were skipped."""


class DeliveryStatus(StrEnum):
    """The state of one recipient of one emailing."""

    QUEUED = "queued"
    """Waiting to be claimed, possibly until a retry time."""
    CLAIMED = "claimed"
    """Reserved by a worker in a batch, not tried yet: a dead worker's go back
    to the queue."""
    SENDING = "sending"
    """In the window a worker is handing to the SMTP server (attempt counted);
    a dead worker's are marked interrupted."""
    SENT = "sent"
    """Accepted by the SMTP server (or written to the outbox)."""
    BOUNCED = "bounced"
    """Refused permanently (5xx); the contact is marked bounced."""
    FAILED = "failed"
    """Temporary failures exhausted the retries; the last reply is kept."""
    SKIPPED = "skipped"
    """Not sent because the emailing was cancelled."""
    INTERRUPTED = "interrupted"
    """Its worker died mid-send, or the server went silent after taking the
    message; never resent, since it may have gone out."""


class TrackingKind(StrEnum):
    """The kind of an append-only tracking event."""

    OPEN = "open"
    CLICK = "click"
    UNSUBSCRIBE = "unsubscribe"
    BOUNCE = "bounce"
