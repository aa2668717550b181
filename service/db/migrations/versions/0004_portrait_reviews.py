"""Portrait reviews: the reviewer's queue of portrait drafts and the notes on each draft.

Revision ID: 0004_portrait_reviews
Revises: 0003_session_hygiene
Create Date: 2026-12-01

``portrait_reviews`` holds one row per portrait draft sent to a reviewer (an artist or a clinician): its
status (waiting, sent back, approved), who asked, who decided, and an encrypted blob of what the queue shows
about the patient. ``portrait_notes`` holds the encrypted notes on a draft, oldest first.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_portrait_reviews"
down_revision = "0003_session_hygiene"
branch_labels = None
depends_on = None

timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "portrait_reviews",
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("ehr_name", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("details", sa.LargeBinary(), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=True),
        sa.Column("decided_by", sa.String(255), nullable=True),
        sa.Column("decided_role", sa.String(32), nullable=True),
        sa.Column("decided_at", timestamp, nullable=True),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_portrait_reviews"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_portrait_reviews_job_id_jobs", ondelete="CASCADE"
        ),
        sa.CheckConstraint(
            "status IN ('waiting', 'sent_back', 'approved')", name="ck_portrait_reviews_status"
        ),
    )
    op.create_index("ix_portrait_reviews_status", "portrait_reviews", ["status"])
    op.create_table(
        "portrait_notes",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("author", sa.String(255), nullable=True),
        sa.Column("author_role", sa.String(32), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_portrait_notes"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_portrait_notes_job_id_jobs", ondelete="CASCADE"
        ),
        sa.CheckConstraint(
            "kind IN ('note', 'sent', 'send_back', 'approve', 'likeness')", name="ck_portrait_notes_kind"
        ),
    )
    op.create_index("ix_portrait_notes_job_id", "portrait_notes", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_portrait_notes_job_id", table_name="portrait_notes")
    op.drop_table("portrait_notes")
    op.drop_index("ix_portrait_reviews_status", table_name="portrait_reviews")
    op.drop_table("portrait_reviews")
