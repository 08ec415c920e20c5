"""jobs: sweeps (a child's parent sweep, its arm and seed)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("sweep_arm", sa.Text(), nullable=True))
        batch.add_column(sa.Column("sweep_seed", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_jobs_parent_id_jobs", "jobs", ["parent_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_index("ix_jobs_parent_id", ["parent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_parent_id")
        batch.drop_constraint("fk_jobs_parent_id_jobs", type_="foreignkey")
        batch.drop_column("sweep_seed")
        batch.drop_column("sweep_arm")
        batch.drop_column("parent_id")
