"""Session hygiene: spent launch states, the readiness probe row, and who owns a job (for queue caps).

Revision ID: 0003_session_hygiene
Revises: 0002_claim_order
Create Date: 2026-12-01

A launch in flight lives in an encrypted cookie, not in a row; only a callback that presents one records its
``state`` (hashed) in ``spent_launch_states`` so the state is single use. ``readiness_probes`` holds one row
per probe name that ``/readyz`` rewrites to prove the database still commits. ``jobs.owner_key`` is a keyed
digest of the EHR and the user, so a per-user cap on queued jobs can be counted without naming the user.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_session_hygiene"
down_revision = "0002_claim_order"
branch_labels = None
depends_on = None

timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "spent_launch_states",
        sa.Column("state_hash", sa.String(64), nullable=False),
        sa.Column("expires_at", timestamp, nullable=False),
        sa.PrimaryKeyConstraint("state_hash", name="pk_spent_launch_states"),
    )
    op.create_index("ix_spent_launch_states_expires_at", "spent_launch_states", ["expires_at"])
    op.create_table(
        "readiness_probes",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("checked_at", timestamp, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_readiness_probes"),
    )
    op.add_column("jobs", sa.Column("owner_key", sa.String(64), nullable=True))
    op.create_index("ix_jobs_owner_key", "jobs", ["owner_key"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("owner_key")
    op.drop_table("readiness_probes")
    op.drop_index("ix_spent_launch_states_expires_at", table_name="spent_launch_states")
    op.drop_table("spent_launch_states")
