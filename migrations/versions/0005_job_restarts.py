"""Jobs: restarts after the trainer or its worker was killed from outside, a budget of their own.

``max_restarts`` bounds them (a job submitted without it gets the service's
``job_bounds.default_restarts``); ``restarts`` counts them. Jobs submitted before this revision
keep the rule they were submitted under: no restarts (0 of 0).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("max_restarts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("restarts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("restarts")
        batch.drop_column("max_restarts")
