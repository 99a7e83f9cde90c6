"""A call task keeps its script as HTML, made once when the task is, instead of on every view of a list.

Tasks made before keep NULL there and are converted when shown.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("call_task", schema=None) as batch_op:
        batch_op.add_column(sa.Column("script_html", sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("call_task", schema=None) as batch_op:
        batch_op.drop_column("script_html")
