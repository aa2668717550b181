"""Initial schema: web sessions, jobs, artifacts, documents, append-only audit records.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-21

On PostgreSQL this also installs the audit guard: a trigger that rejects DELETE, TRUNCATE and every UPDATE of
audit_records except re-wrapping the key header of ``sealed`` (key rotation, run as the owner role) with an
unchanged body. The application role's grants (only SELECT and INSERT on audit_records) are applied by
``migrate(url, app_role=...)`` after every upgrade (service/db/roles.py), so tables added later are covered.
On SQLite, triggers reject DELETE and any UPDATE of a column other than ``sealed`` (a guard against
application bugs; the hash chain detects the rest).
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

timestamp = sa.DateTime(timezone=True)
big_int = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

AUDIT_PLAIN_COLUMNS = (
    "seq",
    "recorded_at",
    "action",
    "outcome",
    "actor_digest",
    "patient_digest",
    "ehr",
    "resource_type",
    "request_id",
    "prev_hash",
    "hash",
)

PG_AUDIT_GUARD = [
    # The body of a CC1 envelope blob (see service/crypto/envelope.py): skip magic, kid and wrapped key.
    """
    CREATE FUNCTION carecanvas_sealed_body(blob bytea) RETURNS bytea
    LANGUAGE plpgsql IMMUTABLE AS $$
    DECLARE
        kid_len integer;
        wrapped_len integer;
    BEGIN
        IF blob IS NULL OR length(blob) < 6 OR substring(blob FROM 1 FOR 3) <> decode('434331', 'hex') THEN
            RETURN NULL;
        END IF;
        kid_len := get_byte(blob, 3);
        wrapped_len := get_byte(blob, 4 + kid_len);
        RETURN substring(blob FROM 6 + kid_len + wrapped_len);
    END;
    $$
    """,
    f"""
    CREATE FUNCTION carecanvas_audit_guard() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'UPDATE' THEN
            RAISE EXCEPTION USING
                MESSAGE = 'audit_records is append-only: ' || TG_OP || ' is not allowed',
                ERRCODE = 'insufficient_privilege';
        END IF;
        IF ({", ".join("NEW." + c for c in AUDIT_PLAIN_COLUMNS)})
           IS DISTINCT FROM ({", ".join("OLD." + c for c in AUDIT_PLAIN_COLUMNS)})
           OR carecanvas_sealed_body(NEW.sealed) IS NULL
           OR carecanvas_sealed_body(NEW.sealed) IS DISTINCT FROM carecanvas_sealed_body(OLD.sealed) THEN
            RAISE EXCEPTION USING
                MESSAGE = 'audit_records is append-only: only re-wrapping the key of sealed is allowed',
                ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
    END;
    $$
    """,
    """
    CREATE TRIGGER audit_records_guard_rows BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION carecanvas_audit_guard()
    """,
    """
    CREATE TRIGGER audit_records_guard_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION carecanvas_audit_guard()
    """,
]

SQLITE_AUDIT_GUARD = [
    """
    CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
    BEGIN SELECT RAISE(ABORT, 'audit_records is append-only: DELETE is not allowed'); END
    """,
    f"""
    CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
    WHEN {" OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in AUDIT_PLAIN_COLUMNS)}
    BEGIN SELECT RAISE(ABORT, 'audit_records is append-only: only re-wrapping sealed is allowed'); END
    """,
]


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.Column("expires_at", timestamp, nullable=False),
        sa.Column("ehr_name", sa.String(128), nullable=True),
        sa.Column("csrf_token", sa.String(128), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id_hash", name="pk_web_sessions"),
    )
    op.create_index("ix_web_sessions_expires_at", "web_sessions", ["expires_at"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("bucket", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", timestamp, nullable=True),
        sa.Column("progress_step", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("error", sa.String(300), nullable=True),
        sa.Column("spec", sa.LargeBinary(), nullable=False),
        sa.Column("session_id_hash", sa.String(64), nullable=True),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.Column("started_at", timestamp, nullable=True),
        sa.Column("finished_at", timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'quarantined')",
            name="ck_jobs_status",
        ),
    )
    op.create_index("ix_jobs_status_bucket_created_at", "jobs", ["status", "bucket", "created_at"])
    op.create_index("ix_jobs_status_lease_expires_at", "jobs", ["status", "lease_expires_at"])
    op.create_index("ix_jobs_session_id_hash", "jobs", ["session_id_hash"])

    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_artifacts_job_id_jobs", ondelete="CASCADE"),
        sa.UniqueConstraint("job_id", "kind", name="uq_artifacts_job_id_kind"),
        sa.CheckConstraint("kind IN ('png', 'pdf', 'preview')", name="ck_artifacts_kind"),
    )

    op.create_table(
        "documents",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("fhir_document_id", sa.String(255), nullable=True),
        sa.Column("identifier", sa.String(255), nullable=True),
        sa.Column("ehr_name", sa.String(128), nullable=True),
        sa.Column("approved_by_hash", sa.String(64), nullable=True),
        sa.Column("approved_at", timestamp, nullable=True),
        sa.Column("written_at", timestamp, nullable=True),
        sa.Column("error", sa.String(300), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_documents"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_documents_job_id_jobs", ondelete="CASCADE"),
        sa.UniqueConstraint("job_id", name="uq_documents_job_id"),
        sa.CheckConstraint(
            "status IN ('draft', 'approved', 'written', 'retracted', 'failed')", name="ck_documents_status"
        ),
    )
    op.create_index("ix_documents_identifier", "documents", ["identifier"])

    op.create_table(
        "audit_records",
        sa.Column("seq", big_int, nullable=False, autoincrement=False),
        sa.Column("recorded_at", timestamp, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("actor_digest", sa.String(64), nullable=True),
        sa.Column("patient_digest", sa.String(64), nullable=True),
        sa.Column("ehr", sa.String(128), nullable=True),
        sa.Column("resource_type", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_records"),
        sa.UniqueConstraint("hash", name="uq_audit_records_hash"),
    )
    for column in ("recorded_at", "action", "actor_digest", "patient_digest"):
        op.create_index(f"ix_audit_records_{column}", "audit_records", [column])

    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for statement in PG_AUDIT_GUARD:
            op.execute(statement)
    elif dialect == "sqlite":
        for statement in SQLITE_AUDIT_GUARD:
            op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_records_guard_truncate ON audit_records")
        op.execute("DROP TRIGGER IF EXISTS audit_records_guard_rows ON audit_records")
        op.execute("DROP FUNCTION IF EXISTS carecanvas_audit_guard()")
        op.execute("DROP FUNCTION IF EXISTS carecanvas_sealed_body(bytea)")
    for table in ("audit_records", "documents", "artifacts", "jobs", "web_sessions"):
        op.drop_table(table)
