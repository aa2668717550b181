"""Claim order indexes (partial, queued jobs only) and the crash count and solo flag for poison jobs.

Revision ID: 0002_claim_order
Revises: 0001_initial
Create Date: 2026-12-01

The claim picks the first queued job by (priority, created_at, id), then up to a batch of its bucket in the
same order; both walk these indexes and stop at LIMIT instead of sorting every queued job (status leads
so that SQLite's planner, without statistics, prefers them to the plain status index). A job whose worker
died under it twice is claimed alone (``solo``), so only a poison job is charged for the crashes it causes.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_claim_order"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("crashes", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("solo", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index(
        "ix_jobs_queued_claim_order",
        "jobs",
        ["status", "priority", "created_at", "id"],
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )
    op.create_index(
        "ix_jobs_queued_bucket_claim_order",
        "jobs",
        ["status", "bucket", "priority", "created_at", "id"],
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_queued_bucket_claim_order", table_name="jobs")
    op.drop_index("ix_jobs_queued_claim_order", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("solo")
        batch.drop_column("crashes")
