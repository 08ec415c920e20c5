"""jobs: step-level progress (step, steps, images/s, ETA, when reported)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("progress_step", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("progress_steps", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("progress_images_per_second", sa.Float(), nullable=True))
        batch.add_column(sa.Column("progress_eta_seconds", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("progress_updated_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("progress_updated_at")
        batch.drop_column("progress_eta_seconds")
        batch.drop_column("progress_images_per_second")
        batch.drop_column("progress_steps")
        batch.drop_column("progress_step")
