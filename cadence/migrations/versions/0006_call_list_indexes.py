"""Indexes for the call list: a manager's tasks by day and open ones by due time, a contact's outcomes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 21:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_call_task_owner_day", "call_task", ["owner", "due_date"])
    op.create_index("ix_call_task_owner_open", "call_task", ["owner", "status", "due_at"])
    op.create_index("ix_outcome_contact_time", "outcome", ["contact_id", "occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_outcome_contact_time", table_name="outcome")
    op.drop_index("ix_call_task_owner_open", table_name="call_task")
    op.drop_index("ix_call_task_owner_day", table_name="call_task")
