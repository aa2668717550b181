"""`carecanvas migrate`: upgrade the schema as the owner role and grant the application role its minimum."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

URL_HELP = (
    "the owner role's database URL (default: CARECANVAS_MIGRATION_DATABASE_URL, else "
    "CARECANVAS_DATABASE_URL, else the embedded SQLite file); prefer the environment variable, a flag shows "
    "up in process lists"
)
APP_ROLE_HELP = (
    "PostgreSQL: the application's login role (the user in CARECANVAS_DATABASE_URL); it gets read/write on "
    "the working tables and only SELECT and INSERT on the audit table"
)


def add_migrate_parser(commands: Any) -> None:
    """Register ``migrate`` on the ``carecanvas`` sub-command parser."""
    parser = commands.add_parser("migrate", help="upgrade the database schema (as the owner role)")
    parser.add_argument("--app-role", metavar="NAME", help=APP_ROLE_HELP)
    parser.add_argument("--database-url", metavar="URL", help=URL_HELP)
    parser.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from alembic.util.exc import CommandError
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from service.db.engine import migrate, normalise_url
    from service.db.roles import AppRoleError
    from service.settings import Settings

    settings = Settings()
    url = args.database_url or settings.resolved_migration_database_url
    try:
        where = make_url(normalise_url(url)).render_as_string(hide_password=True)
    except (ArgumentError, ValueError) as error:
        print(f"migrate: invalid database URL: {error}", file=sys.stderr)
        return 2
    if url == settings.resolved_database_url and settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)  # the embedded SQLite file lives there
    try:
        report = asyncio.run(migrate(url, app_role=args.app_role))
    except AppRoleError as error:
        print(f"migrate: {error}", file=sys.stderr)
        return 2
    except DBAPIError as error:
        # The driver's own message (connection refused, permission denied …), not SQLAlchemy's wrapper.
        reason = str(error.orig).strip().splitlines()[0] if error.orig is not None else type(error).__name__
        print(f"migrate failed on {where}: {reason}", file=sys.stderr)
        return 1
    except CommandError as error:
        # e.g. the database is at a revision this release does not know (a newer release migrated it).
        print(f"migrate failed on {where}: {error}", file=sys.stderr)
        return 1
    print(f"database is at the latest revision ({report.revision}) on {where}")
    if report.app_role is not None:
        grants = report.app_role
        working = ", ".join(grants.working_tables)
        append_only = ", ".join(grants.append_only_tables)
        print(
            f"app role {grants.role!r} in schema {grants.schema!r}: read/write on {working}; "
            f"SELECT, INSERT only on {append_only}"
        )
    elif make_url(normalise_url(url)).get_backend_name() == "postgresql":
        print(
            "no --app-role given: no application role was granted access; run serve and worker as this role "
            "only for a trial, since it owns (and can rewrite) the audit table",
            file=sys.stderr,
        )
    return 0
