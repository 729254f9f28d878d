"""Pair checks: sampled pairs of a gallery's crops for a person to judge (pair_checks), and the
answers, kept per pair of a dataset's images so that a retrained version reuses them
(pair_answers).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-12
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# Frozen here (not imported from service.core.models): a revision must not change afterwards.
ANSWERS = ("same", "different", "unsure")


def _when(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def _dataset_key(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["dataset_id"],
        ["datasets.id"],
        name=op.f(f"fk_{table}_dataset_id_datasets"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "pair_checks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("gallery_id", sa.Uuid(), nullable=False),
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("model_name", sa.String(length=256), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("query_count", sa.Integer(), nullable=False),
        sa.Column("pairs", JSON, nullable=False),
        _when("created_at"),
        sa.ForeignKeyConstraint(
            ["gallery_id"],
            ["galleries.id"],
            name=op.f("fk_pair_checks_gallery_id_galleries"),
            ondelete="CASCADE",
        ),
        _dataset_key("pair_checks"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pair_checks")),
        sa.UniqueConstraint("gallery_id", name=op.f("uq_pair_checks_gallery_id")),
    )
    op.create_index(op.f("ix_pair_checks_dataset_id"), "pair_checks", ["dataset_id"])
    op.create_index("ix_pair_checks_owner_created_at", "pair_checks", ["owner", "created_at", "id"])
    op.create_table(
        "pair_answers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("image_a", sa.Text(), nullable=False),
        sa.Column("image_b", sa.Text(), nullable=False),
        sa.Column(
            "answer",
            sa.Enum(
                *ANSWERS, name="pair_answer", native_enum=False, create_constraint=True, length=16
            ),
            nullable=False,
        ),
        _when("created_at"),
        _when("updated_at"),
        _dataset_key("pair_answers"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pair_answers")),
        sa.UniqueConstraint(
            "owner", "dataset_id", "image_a", "image_b", name="uq_pair_answers_owner_pair"
        ),
    )
    op.create_index(op.f("ix_pair_answers_dataset_id"), "pair_answers", ["dataset_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_pair_answers_dataset_id"), table_name="pair_answers")
    op.drop_table("pair_answers")
    op.drop_index("ix_pair_checks_owner_created_at", table_name="pair_checks")
    op.drop_index(op.f("ix_pair_checks_dataset_id"), table_name="pair_checks")
    op.drop_table("pair_checks")
