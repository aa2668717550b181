"""The owner/app split on PostgreSQL: migrate as the owner, then the app role cannot rewrite the audit log.

Each test creates its own owner and app login roles (random suffixes, dropped afterwards) and a schema owned
by the owner, runs ``migrate(..., app_role=...)`` as the owner, and then connects *as the app role*.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.audit import AuditAction
from service.audit.verify import VerifyResult
from service.cli import main as carecanvas
from service.db import AppRoleError, grant_app_role, make_engine, migrate
from service.db.engine import alembic_config
from service.services import Services, build_services
from service.sessions import SessionData
from service.settings import Settings

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()

SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REPO_ROOT = Path(__file__).resolve().parents[2]
CARECANVAS = Path(sys.executable).with_name("carecanvas")
GUARD_TRIGGER = "audit_records_guard_rows"


@dataclass(frozen=True)
class SplitRoles:
    owner: str
    app: str
    schema: str

    def url(self, role: str) -> str:
        return f"postgresql+psycopg://{role}@127.0.0.1:5432/test?options=-csearch_path%3D{self.schema}"

    @property
    def owner_url(self) -> str:
        return self.url(self.owner)

    @property
    def app_url(self) -> str:
        return self.url(self.app)


async def admin(*statements: str) -> None:
    """Run statements as the cluster superuser (role and schema set-up, the DBA's part)."""
    engine = make_engine(SERVER)
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def roles() -> AsyncIterator[SplitRoles]:
    suffix = secrets.token_hex(5)
    split = SplitRoles(owner=f"cc_owner_{suffix}", app=f"cc_app_{suffix}", schema=f"cc_test_{suffix}")
    await admin(
        f"CREATE ROLE {split.owner} LOGIN",
        f"CREATE ROLE {split.app} LOGIN",
        f"CREATE SCHEMA {split.schema} AUTHORIZATION {split.owner}",
    )
    try:
        yield split
    finally:
        await admin(
            f"DROP SCHEMA IF EXISTS {split.schema} CASCADE",
            f"DROP OWNED BY {split.owner}, {split.app}",
            f"DROP ROLE {split.app}",
            f"DROP ROLE {split.owner}",
        )


async def run_as(url: str, *statements: str) -> None:
    """Run ``statements`` in one transaction on a connection of the URL's role; committed if all succeed."""
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def refused(url: str, *statements: str) -> str:
    """The database's message when the role of ``url`` runs ``statements``; fails the test if they succeed."""
    with pytest.raises(DBAPIError) as raised:
        await run_as(url, *statements)
    assert getattr(raised.value.orig, "sqlstate", None) == "42501", raised.value  # insufficient_privilege
    return str(raised.value.orig)


async def scalar(url: str, query: str, **params: str) -> object:
    engine = make_engine(url)
    try:
        async with engine.connect() as connection:
            return (await connection.execute(text(query), params)).scalar_one()
    finally:
        await engine.dispose()


@pytest.fixture
def services_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Awaitable[Services]]:
    """The app's real services (build_services) on a URL, keys from `keys generate` and `audit keygen`."""

    for key in [k for k in os.environ if k.startswith("CARECANVAS_")]:
        monkeypatch.delenv(key)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("CARECANVAS_KEK_FILE", str(data_dir / "keys.json"))
    monkeypatch.setenv("CARECANVAS_AUDIT_SIGNING_KEY_FILE", str(data_dir / "audit-signing.key"))
    assert carecanvas(["keys", "generate"]) == 0
    assert carecanvas(["audit", "keygen"]) == 0

    async def build(database_url: str) -> Services:
        return await build_services(Settings(database_url=database_url))

    return build


async def append_records(services: Services, count: int, *, patient: str = "pat-1") -> None:
    for number in range(count):
        async with services.sessionmaker() as db, db.begin():
            await services.audit.append(
                db,
                action=AuditAction.FHIR_READ,
                outcome="success",
                actor="Practitioner/prac-1",
                patient=patient,
                ehr="sandbox",
                resource=f"Condition/cond-{number}",
                request_id=f"req-{number}",
            )


async def verify(services: Services) -> VerifyResult:
    async with services.sessionmaker() as db:
        return await services.audit.verify(db)


@pytest.mark.postgres
async def test_app_role_does_the_apps_work_but_cannot_change_the_audit_table(roles, services_factory):
    report = await migrate(roles.owner_url, app_role=roles.app)
    assert report.revision == HEAD
    assert report.app_role is not None
    assert report.app_role.append_only_tables == ("audit_records",)
    assert set(report.app_role.working_tables) == {
        "artifacts",
        "documents",
        "jobs",
        "web_sessions",
        "spent_launch_states",  # tables added later get the same grants (roles applied after every upgrade)
        "readiness_probes",
        "portrait_reviews",
        "portrait_notes",
    }
    assert (
        await scalar(
            roles.owner_url,
            "SELECT tableowner FROM pg_tables WHERE tablename = 'audit_records' AND schemaname = :schema",
            schema=roles.schema,
        )
        == roles.owner
    )

    services = await services_factory(roles.app_url)
    try:
        assert await scalar(roles.app_url, "SELECT current_user") == roles.app
        # The app's normal work, as the app role: a session, a job with an artifact, a draft, audit records.
        async with services.sessionmaker() as db, db.begin():
            cookie, web_session = await services.sessions.create(
                db, ehr_name="sandbox", data=SessionData(patient="pat-1")
            )
            job_id = await services.queue.enqueue(
                db,
                kind="illustration",
                bucket="tiny",
                spec={"prompt": "a heart"},
                session_id_hash=web_session.id_hash,
            )
        async with services.sessionmaker() as db, db.begin():
            loaded = await services.sessions.load(db, cookie)
            assert loaded is not None
            assert loaded.patient_id == "pat-1"
            loaded.data.encounter = "enc-1"
            await services.sessions.save(db, loaded)
        (claimed,) = await services.queue.claim_batch(worker_id="w1", max_jobs=1)
        assert claimed.id == job_id
        assert await services.queue.complete(job_id, "w1", artifacts={"png": b"\x89PNG-bytes"})
        assert await services.queue.read_artifact(job_id, "png") == b"\x89PNG-bytes"
        from service.documents import DraftContent, create_draft

        async with services.sessionmaker() as db, db.begin():
            await create_draft(
                db,
                keyring=services.keyring,
                job_id=job_id,
                ehr_name="sandbox",
                content=DraftContent(title="x"),
            )
        await append_records(services, 3)
        async with services.sessionmaker() as db:
            await services.audit.checkpoint(db)
            assert len(await services.audit.search(db, patient="pat-1")) == 3
        result = await verify(services)
        assert (result.ok, result.count) == (True, 3)
        async with services.sessionmaker() as db, db.begin():
            session_row = await services.sessions.load(db, cookie)
            assert session_row is not None
            await services.sessions.end(db, session_row)  # DELETE on a working table is allowed
    finally:
        await services.aclose()

    # ...and the audit table refuses every change but INSERT, by privilege (not only by the trigger).
    for statement in (
        "UPDATE audit_records SET action = 'view'",
        "UPDATE audit_records SET sealed = sealed",  # the old UPDATE (sealed) grant allowed this
        "DELETE FROM audit_records WHERE seq > 1",
        "TRUNCATE audit_records",
        "LOCK TABLE audit_records IN ACCESS EXCLUSIVE MODE",
    ):
        assert "permission denied for table audit_records" in await refused(roles.app_url, statement), (
            statement
        )
    for statement in (
        f"ALTER TABLE audit_records DISABLE TRIGGER {GUARD_TRIGGER}",
        "ALTER TABLE audit_records DISABLE TRIGGER ALL",
        "ALTER TABLE audit_records RENAME TO audit_records_old",
        f"DROP TRIGGER {GUARD_TRIGGER} ON audit_records",
        "DROP TABLE audit_records",
    ):
        message = await refused(roles.app_url, statement)
        assert re.search(r"must be owner of (table|relation) audit_records", message), statement
    # Other ways round the trigger: replace its function, add a trigger, replication mode, drop the schema.
    message = await refused(
        roles.app_url,
        "CREATE OR REPLACE FUNCTION carecanvas_audit_guard() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN RETURN NEW; END; $$",
    )
    # Refused at the schema (no CREATE), and it would be refused as the function's non-owner too.
    assert re.search(rf"permission denied for schema {roles.schema}|must be owner of function", message)
    message = await refused(
        roles.app_url,
        "CREATE TRIGGER t BEFORE INSERT ON audit_records "
        "FOR EACH ROW EXECUTE FUNCTION carecanvas_audit_guard()",
    )
    assert "permission denied for table audit_records" in message
    assert "permission denied to set parameter" in await refused(
        roles.app_url, "SET session_replication_role = replica"
    )
    assert f"must be owner of schema {roles.schema}" in await refused(
        roles.app_url, f"DROP SCHEMA {roles.schema} CASCADE"
    )
    assert "permission denied for table alembic_version" in await refused(
        roles.app_url, "UPDATE alembic_version SET version_num = 'x'"
    )
    assert await scalar(roles.owner_url, "SELECT count(*) FROM audit_records") == 3


@pytest.mark.postgres
async def test_disable_trigger_and_delete_the_tail_is_refused_to_the_app_role(roles, services_factory):
    """The issue's attack, as the app role: disable the guard, delete the unanchored tail, re-enable it."""
    await migrate(roles.owner_url, app_role=roles.app)
    services = await services_factory(roles.app_url)
    try:
        await append_records(services, 4)
        async with services.sessionmaker() as db:
            await services.audit.checkpoint(db)  # anchors records 1..4
        await append_records(services, 3, patient="pat-2")  # 5..7: not yet anchored
        attack = (
            f"ALTER TABLE audit_records DISABLE TRIGGER {GUARD_TRIGGER}",
            "DELETE FROM audit_records WHERE seq > 4",
            f"ALTER TABLE audit_records ENABLE TRIGGER {GUARD_TRIGGER}",
        )
        assert "must be owner of table audit_records" in await refused(roles.app_url, *attack)
        # Skipping the ALTER leaves the DELETE, which the app role may not run at all.
        assert "permission denied" in await refused(roles.app_url, *attack[1:2])
        result = await verify(services)
        assert (result.ok, result.count) == (True, 7)
        async with services.sessionmaker() as db:
            assert len(await services.audit.search(db, patient="pat-2")) == 3
    finally:
        await services.aclose()
    # The same statements are valid SQL that the owner can run: the refusal above is the role split's doing.
    engine = make_engine(roles.owner_url)
    try:
        async with engine.connect() as connection:
            transaction = await connection.begin()
            for statement in attack:
                await connection.execute(text(statement))
            await transaction.rollback()
    finally:
        await engine.dispose()
    assert await scalar(roles.owner_url, "SELECT count(*) FROM audit_records") == 7
    # Key rotation's re-wrap (body unchanged) is the owner's to run; the trigger still refuses other changes.
    await run_as(roles.owner_url, "UPDATE audit_records SET sealed = sealed")
    assert "append-only" in await refused(roles.owner_url, "UPDATE audit_records SET action = 'view'")
    assert "append-only" in await refused(roles.owner_url, "DELETE FROM audit_records WHERE seq > 4")


@pytest.mark.postgres
async def test_rerun_revokes_older_grants_and_leaves_other_tables_alone(roles):
    await migrate(roles.owner_url, app_role=roles.app)
    # What the earlier migration granted (UPDATE of sealed), and another application's table in the schema.
    await run_as(
        roles.owner_url,
        f"GRANT UPDATE (sealed), TRUNCATE, TRIGGER ON audit_records TO {roles.app}",
        "CREATE TABLE later_work (id integer PRIMARY KEY)",
    )
    assert (
        await scalar(
            roles.owner_url,
            f"SELECT has_column_privilege('{roles.app}', 'audit_records', 'sealed', 'UPDATE')",
        )
        is True
    )
    report = await migrate(roles.owner_url, app_role=roles.app)
    assert report.app_role is not None
    assert "later_work" not in report.app_role.working_tables
    assert "permission denied for table later_work" in await refused(
        roles.app_url, "INSERT INTO later_work VALUES (1)"
    )
    for privilege in ("UPDATE", "DELETE", "TRUNCATE", "TRIGGER", "REFERENCES"):
        assert (
            await scalar(
                roles.owner_url, f"SELECT has_table_privilege('{roles.app}', 'audit_records', '{privilege}')"
            )
            is False
        ), privilege
    assert (
        await scalar(
            roles.owner_url,
            f"SELECT has_column_privilege('{roles.app}', 'audit_records', 'sealed', 'UPDATE')",
        )
        is False
    )
    for privilege in ("SELECT", "INSERT"):
        assert (
            await scalar(
                roles.owner_url, f"SELECT has_table_privilege('{roles.app}', 'audit_records', '{privilege}')"
            )
            is True
        )
    await grant_app_role(roles.owner_url, roles.app)  # the same grants again: idempotent


@pytest.mark.postgres
async def test_unsafe_app_roles_are_refused_before_anything_is_created(roles):
    async def tables() -> object:
        return await scalar(
            roles.owner_url, "SELECT count(*) FROM pg_tables WHERE schemaname = :schema", schema=roles.schema
        )

    with pytest.raises(AppRoleError, match="does not exist"):
        await migrate(roles.owner_url, app_role=f"{roles.app}_missing")
    with pytest.raises(AppRoleError, match="is the role running this migration"):
        await migrate(roles.owner_url, app_role=roles.owner)
    with pytest.raises(AppRoleError, match="lower-case PostgreSQL identifier"):
        await migrate(roles.owner_url, app_role='x"; DROP TABLE jobs; --')
    assert await tables() == 0
    await admin(f"GRANT {roles.owner} TO {roles.app}")
    with pytest.raises(AppRoleError, match=f"member of the owner role '{roles.owner}'"):
        await migrate(roles.owner_url, app_role=roles.app)
    await admin(f"REVOKE {roles.owner} FROM {roles.app}", f"GRANT pg_write_all_data TO {roles.app}")
    with pytest.raises(AppRoleError, match="pg_write_all_data"):
        await migrate(roles.owner_url, app_role=roles.app)
    await admin(f"REVOKE pg_write_all_data FROM {roles.app}", f"ALTER ROLE {roles.app} SUPERUSER")
    with pytest.raises(AppRoleError, match="is a superuser"):
        await migrate(roles.owner_url, app_role=roles.app)
    await admin(f"ALTER ROLE {roles.app} NOSUPERUSER", f"ALTER SCHEMA {roles.schema} OWNER TO {roles.app}")
    await admin(f"GRANT CREATE, USAGE ON SCHEMA {roles.schema} TO {roles.owner}")
    with pytest.raises(AppRoleError, match=f"owns schema '{roles.schema}'"):
        await migrate(roles.owner_url, app_role=roles.app)
    assert await tables() == 0


@pytest.mark.postgres
async def test_an_app_role_that_owns_the_database_is_refused(roles):
    database = f"cc_db_{roles.schema.removeprefix('cc_test_')}"
    engine = make_engine(SERVER, isolation_level="AUTOCOMMIT")  # CREATE DATABASE runs outside a transaction
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f"CREATE DATABASE {database} OWNER {roles.app}"))
        try:
            owner_url = f"postgresql+psycopg://{roles.owner}@127.0.0.1:5432/{database}"
            with pytest.raises(AppRoleError, match=f"owns database '{database}'"):
                await migrate(owner_url, app_role=roles.app)
        finally:
            async with engine.connect() as connection:
                await connection.execute(text(f"DROP DATABASE {database}"))
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_the_old_single_role_setup_is_refused_until_ownership_moves(roles):
    """The docs used to let the app role create (own) the tables; migrate as owner says how to fix that."""
    await admin(f"GRANT CREATE, USAGE ON SCHEMA {roles.schema} TO {roles.app}")
    await migrate(roles.app_url)  # the old way: the app role runs the migrations and owns everything
    with pytest.raises(AppRoleError, match="REASSIGN OWNED BY"):
        await migrate(roles.owner_url, app_role=roles.app)
    await admin(
        f"REASSIGN OWNED BY {roles.app} TO {roles.owner}",
        f"REVOKE CREATE ON SCHEMA {roles.schema} FROM {roles.app}",
    )
    await migrate(roles.owner_url, app_role=roles.app)
    assert "must be owner" in await refused(
        roles.app_url, f"ALTER TABLE audit_records DISABLE TRIGGER {GUARD_TRIGGER}"
    )
    assert "permission denied for schema" in await refused(roles.app_url, "CREATE TABLE t (x integer)")


async def test_app_role_on_sqlite_is_a_clear_error(tmp_path):
    with pytest.raises(AppRoleError, match="PostgreSQL only"):
        await migrate(f"sqlite:///{tmp_path / 'x.db'}", app_role="carecanvas")
    assert not (tmp_path / "x.db").exists() or (tmp_path / "x.db").stat().st_size == 0


@pytest.mark.postgres
def test_cli_migrate_with_app_role_in_a_subprocess(roles, tmp_path):
    """`carecanvas migrate --app-role` reads the owner URL from CARECANVAS_MIGRATION_DATABASE_URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARECANVAS_")}
    env |= {
        "CARECANVAS_MIGRATION_DATABASE_URL": roles.owner_url,
        "CARECANVAS_DATABASE_URL": roles.app_url,
        "CARECANVAS_DATA_DIR": str(tmp_path / "data"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(  # our own console script
        [str(CARECANVAS), "migrate", "--app-role", roles.app],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"database is at the latest revision ({HEAD})" in done.stdout
    assert f"app role '{roles.app}'" in done.stdout
    assert "SELECT, INSERT only on audit_records" in done.stdout
    assert "Traceback" not in done.stderr
    assert "permission denied" in asyncio_run_refused(roles.app_url, "DELETE FROM audit_records")

    again = subprocess.run(  # a refused role: a clear message and rc 2, no traceback
        [str(CARECANVAS), "migrate", "--app-role", roles.owner],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 2
    assert "is the role running this migration" in again.stderr
    assert "Traceback" not in again.stderr


def asyncio_run_refused(url: str, statement: str) -> str:
    import asyncio

    return asyncio.run(refused(url, statement))


def test_cli_migrate_on_a_database_from_a_newer_release_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sqlite3

    for key in [k for k in os.environ if k.startswith("CARECANVAS_")]:
        monkeypatch.delenv(key)
    database = tmp_path / "newer.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        connection.execute("INSERT INTO alembic_version VALUES ('0099_from_the_future')")
    assert carecanvas(["migrate", "--database-url", f"sqlite:///{database}"]) == 1
    err = capsys.readouterr().err
    assert "migrate failed on sqlite+aiosqlite:///" in err
    assert "0099_from_the_future" in err
    assert "Traceback" not in err


@pytest.mark.postgres
def test_cli_migrate_failures_are_clear_messages(roles, tmp_path, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("CARECANVAS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path / "data"))
    assert carecanvas(["migrate", "--database-url", "mysql://u@h/db"]) == 2
    assert "invalid database URL" in capsys.readouterr().err
    # Nothing listens on port 1: the driver's reason, the URL without its password, no traceback.
    assert carecanvas(["migrate", "--database-url", "postgresql://u:hunter2@127.0.0.1:1/x"]) == 1
    err = capsys.readouterr().err
    assert "migrate failed on postgresql+psycopg://u:***@127.0.0.1:1/x" in err
    assert "hunter2" not in err
    assert "Traceback" not in err
    assert carecanvas(["migrate", "--database-url", roles.owner_url, "--app-role", "nobody_here_x"]) == 2
    assert "role 'nobody_here_x' does not exist" in capsys.readouterr().err
    assert carecanvas(["migrate", "--app-role", roles.app]) == 2  # the embedded SQLite file has no roles
    assert "PostgreSQL only" in capsys.readouterr().err
    # Without --app-role on PostgreSQL the migration runs and says that nobody was granted anything.
    assert carecanvas(["migrate", "--database-url", roles.owner_url]) == 0
    out = capsys.readouterr()
    assert f"latest revision ({HEAD})" in out.out
    assert "no --app-role given" in out.err
    assert f"permission denied for schema {roles.schema}" in asyncio_run_refused(
        roles.app_url,
        f"SELECT count(*) FROM {roles.schema}.jobs",  # noqa: S608 - a test's own schema
    )
