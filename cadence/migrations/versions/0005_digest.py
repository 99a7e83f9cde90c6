"""Morning digests: one per manager and local day.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 19:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import cadence.models

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "digest",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("local_date", sa.Date(), nullable=False),
        sa.Column("created_at", cadence.models.UTCDateTime(), nullable=False),
        sa.Column("sent_at", cadence.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("owner", "local_date", name="uq_digest_owner_day"),
    )


def downgrade() -> None:
    op.drop_table("digest")
