"""Jobs: an index for an owner's jobs newest first (GET /v1/jobs).

Without it the first page reads and sorts every job of the owner (measured: 18.5 ms with 10,000
jobs, linear in their number); with it, a backward index scan reads the 50 rows of the page.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_created_at", "jobs", ["owner", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_created_at", table_name="jobs")
