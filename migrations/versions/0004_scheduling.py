"""scheduling: job resources and runs, team weights and usage, the worker registry

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-11 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="1.0"))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("memory_gb", sa.Float(), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("preemptible", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("run_started_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("devices", sa.String(length=200), nullable=True))
        batch.add_column(
            sa.Column("preempt_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("preempted_for", sa.String(length=32), nullable=True))
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=200), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("memory_gb", sa.Float(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_table(
        "team_usage",
        sa.Column("team_id", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
            name=op.f("fk_team_usage_team_id_teams"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("team_id", name=op.f("pk_team_usage")),
    )


def downgrade() -> None:
    op.drop_table("team_usage")
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        for column in (
            "preempted_for",
            "preempt_requested",
            "devices",
            "run_started_at",
            "preemptible",
            "priority",
            "memory_gb",
            "gpus",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("weight")
