"""Galleries: searchable indexes of a dataset's images, embedded by a registered model version.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (not imported from service.core.models): a revision must not change afterwards.
GALLERY_STATES = ("QUEUED", "BUILDING", "READY", "FAILED")


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "galleries",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("dataset_id", sa.Uuid(), nullable=True),
        sa.Column("dataset_path", sa.Text(), nullable=False),
        sa.Column("dataset_format", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.String(length=256), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                *GALLERY_STATES,
                name="gallery_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("image_count", sa.Integer(), nullable=True),
        sa.Column("images_done", sa.Integer(), nullable=False),
        sa.Column("skipped_count", sa.Integer(), nullable=False),
        sa.Column("feature_dim", sa.Integer(), nullable=True),
        sa.Column("worker_id", sa.String(length=256), nullable=True),
        _when("heartbeat_at", nullable=True),
        _when("created_at"),
        _when("updated_at"),
        _when("started_at", nullable=True),
        _when("finished_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_galleries_dataset_id_datasets"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_galleries")),
    )
    op.create_index(op.f("ix_galleries_dataset_id"), "galleries", ["dataset_id"])
    op.create_index("ix_galleries_owner_created_at", "galleries", ["owner", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_galleries_owner_created_at", table_name="galleries")
    op.drop_index(op.f("ix_galleries_dataset_id"), table_name="galleries")
    op.drop_table("galleries")
