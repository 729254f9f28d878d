"""Galleries: their state changes with reasons (gallery_events), as jobs have job_events.

Galleries created before this revision have no events; their later changes are recorded.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (not imported from service.core.models): a revision must not change afterwards.
GALLERY_STATES = ("QUEUED", "BUILDING", "READY", "FAILED")


def _state(name: str) -> sa.Enum:
    return sa.Enum(
        *GALLERY_STATES, name=name, native_enum=False, create_constraint=True, length=16
    )


def upgrade() -> None:
    op.create_table(
        "gallery_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("gallery_id", sa.Uuid(), nullable=False),
        sa.Column("from_state", _state("gallery_event_from_state"), nullable=True),
        sa.Column("to_state", _state("gallery_event_to_state"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["gallery_id"],
            ["galleries.id"],
            name=op.f("fk_gallery_events_gallery_id_galleries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gallery_events")),
    )
    op.create_index(op.f("ix_gallery_events_gallery_id"), "gallery_events", ["gallery_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_gallery_events_gallery_id"), table_name="gallery_events")
    op.drop_table("gallery_events")
