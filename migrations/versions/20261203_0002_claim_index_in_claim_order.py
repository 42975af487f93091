"""claim index in claim order

The claim takes queued deliveries ordered by ``next_attempt_at, id``; with
``id`` in the index, the database reads one batch in index order instead of
sorting every queued delivery of the emailing for each claim.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = ["emailing_id", "status", "next_attempt_at"]
_NEW = [*_OLD, "id"]


def upgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_index("ix_delivery_claim")
        batch_op.create_index("ix_delivery_claim", _NEW, unique=False)


def downgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_index("ix_delivery_claim")
        batch_op.create_index("ix_delivery_claim", _OLD, unique=False)
