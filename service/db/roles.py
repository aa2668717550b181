"""The app's PostgreSQL role: read/write on the working tables, insert-only on the audit table, owns nothing.

Migrations run as an owner role; ``apply_app_role_grants`` then gives the application's login role exactly
what serve and worker need. An owner (or a member of the owner, a superuser, the schema's owner) could ALTER
the audit table, disable its trigger or drop the schema, so such a role is refused as the app role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Connection, text

from service.db.models import Base

# Tables the application may only INSERT into and SELECT from (the hash-chained audit log).
APPEND_ONLY_TABLES = ("audit_records",)
# Alembic's bookkeeping: the app reads it (a no-op `migrate_on_start`), only the owner writes it.
READ_ONLY_TABLES = ("alembic_version",)
WORKING_TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"
APPEND_ONLY_PRIVILEGES = "SELECT, INSERT"

_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class AppRoleError(ValueError):
    """The named role cannot be the insert-only application role; the message says why and what to do."""


@dataclass(frozen=True)
class AppRoleGrants:
    """What ``apply_app_role_grants`` granted, for the CLI's report."""

    role: str
    schema: str
    working_tables: tuple[str, ...]
    append_only_tables: tuple[str, ...]
    read_only_tables: tuple[str, ...]


def checked_role(role: str) -> str:
    """``role`` if it is a plain lower-case identifier (it is interpolated into GRANT statements)."""
    if not _ROLE_NAME.match(role):
        raise AppRoleError(
            "app role must be a lower-case PostgreSQL identifier ([a-z_][a-z0-9_]*, ≤63 chars)"
        )
    return role


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def grant_statements(grants: AppRoleGrants) -> list[str]:
    """REVOKE first (older grants such as UPDATE(sealed) must not survive), then grant the minimum."""
    role = quote_identifier(checked_role(grants.role))
    schema = quote_identifier(grants.schema)
    statements = [
        f"REVOKE CREATE ON SCHEMA {schema} FROM {role}",
        f"GRANT USAGE ON SCHEMA {schema} TO {role}",
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}",
    ]
    for table in grants.working_tables:
        qualified = f"{schema}.{quote_identifier(table)}"
        statements += [
            f"REVOKE ALL ON {qualified} FROM {role}",
            f"GRANT {WORKING_TABLE_PRIVILEGES} ON {qualified} TO {role}",
        ]
    for table in grants.append_only_tables:
        qualified = f"{schema}.{quote_identifier(table)}"
        statements += [
            # Revoking at table level also revokes column grants such as the former UPDATE (sealed).
            f"REVOKE ALL ON {qualified} FROM {role}",
            f"REVOKE ALL ON {qualified} FROM PUBLIC",
            f"GRANT {APPEND_ONLY_PRIVILEGES} ON {qualified} TO {role}",
        ]
    for table in grants.read_only_tables:
        qualified = f"{schema}.{quote_identifier(table)}"
        statements += [f"REVOKE ALL ON {qualified} FROM {role}", f"GRANT SELECT ON {qualified} TO {role}"]
    return statements


def check_app_role(connection: Connection, role: str) -> str:
    """Raise ``AppRoleError`` unless ``role`` exists without the owner's powers; returns the schema."""
    checked_role(role)
    schema = str(connection.execute(text("SELECT current_schema()")).scalar_one())
    row = connection.execute(
        text("SELECT rolsuper, current_user AS me FROM pg_roles WHERE rolname = :role"), {"role": role}
    ).first()
    if row is None:
        raise AppRoleError(
            f"role {role!r} does not exist: create the application's login role first "
            f"(CREATE ROLE {role} LOGIN PASSWORD '…'), then run migrate again"
        )
    if row.me == role:
        raise AppRoleError(
            f"the app role {role!r} is the role running this migration: connect as the owner role "
            "(CARECANVAS_MIGRATION_DATABASE_URL or --database-url) and name the application's role "
            "with --app-role"
        )
    if row.rolsuper:
        raise AppRoleError(
            f"role {role!r} is a superuser: it could rewrite the audit log; use a plain login role"
        )
    if _has_privileges_of(connection, role, "current_user"):
        raise AppRoleError(
            f"role {role!r} is a member of the owner role {row.me!r} and so could alter the audit table; "
            f"REVOKE {row.me} FROM {role}"
        )
    if _has_privileges_of(connection, role, "'pg_write_all_data'"):
        raise AppRoleError(f"role {role!r} holds pg_write_all_data; REVOKE pg_write_all_data FROM {role}")
    database, database_owner = connection.execute(
        text("SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
    ).one()
    if _has_privileges_of(connection, role, "CAST(:owner AS name)", owner=database_owner):
        raise AppRoleError(
            f"role {role!r} owns database {database!r} (or is a member of its owner) and could drop it; "
            f"as a superuser: ALTER DATABASE {quote_identifier(database)} OWNER TO <owner role>"
        )
    schema_owner = connection.execute(
        text("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = :schema"), {"schema": schema}
    ).scalar_one()
    if _has_privileges_of(connection, role, "CAST(:owner AS name)", owner=schema_owner):
        raise AppRoleError(
            f"role {role!r} owns schema {schema!r} (or is a member of its owner) and could drop it with the "
            f"audit table; as a superuser: ALTER SCHEMA {quote_identifier(schema)} OWNER TO <owner role>"
        )
    owned = connection.execute(
        text(
            "SELECT tablename FROM pg_tables WHERE schemaname = :schema "
            "AND pg_has_role(CAST(:role AS name), tableowner, 'MEMBER') ORDER BY tablename"
        ),
        {"schema": schema, "role": role},
    ).scalars()
    owned_tables = list(owned)
    if owned_tables:
        raise AppRoleError(
            f"role {role!r} owns {', '.join(owned_tables)} in schema {schema!r} (the old single-role setup); "
            f"as a superuser run REASSIGN OWNED BY {role} TO <owner role>, then migrate again as the owner"
        )
    return schema


def _has_privileges_of(connection: Connection, role: str, other: str, **params: str) -> bool:
    """Whether ``role`` is ``other`` (a SQL expression) or a member of it, so it can act with its powers."""
    query = text(
        f"SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {other}) "  # noqa: S608 - fixed expressions
        f"AND pg_has_role(CAST(:role AS name), {other}, 'MEMBER')"
    )
    return bool(connection.execute(query, {"role": role, **params}).scalar_one())


def apply_app_role_grants(connection: Connection, role: str) -> AppRoleGrants:
    """Check ``role`` and grant it the application's privileges on CareCanvas's tables in the current schema.

    Only tables of our models (and Alembic's) are granted: another application's tables sharing the schema
    stay out of the app role's reach.
    """
    schema = check_app_role(connection, role)
    tables = connection.execute(
        text("SELECT tablename FROM pg_tables WHERE schemaname = :schema ORDER BY tablename"),
        {"schema": schema},
    ).scalars()
    ours = set(Base.metadata.tables) | set(READ_ONLY_TABLES)
    names = [name for name in tables if name in ours]
    grants = AppRoleGrants(
        role=role,
        schema=schema,
        working_tables=tuple(t for t in names if t not in APPEND_ONLY_TABLES and t not in READ_ONLY_TABLES),
        append_only_tables=tuple(t for t in names if t in APPEND_ONLY_TABLES),
        read_only_tables=tuple(t for t in names if t in READ_ONLY_TABLES),
    )
    for statement in grant_statements(grants):
        connection.exec_driver_sql(statement)
    return grants
