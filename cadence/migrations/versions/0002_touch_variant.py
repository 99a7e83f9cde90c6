"""A touch remembers the A/B variant it was given; a block remembers when its end was acted on.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import cadence.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("touch", schema=None) as batch_op:
        batch_op.add_column(sa.Column("variant", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
    with op.batch_alter_table("block", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ended_seen_at", cadence.models.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("block", schema=None) as batch_op:
        batch_op.drop_column("ended_seen_at")
    with op.batch_alter_table("touch", schema=None) as batch_op:
        batch_op.drop_column("variant")
