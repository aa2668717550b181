"""Database layer: SQLAlchemy 2 async models, engine factory, Alembic migrations and the app role's grants."""

from service.db.engine import (
    MigrationReport,
    grant_app_role,
    make_engine,
    make_read_sessionmaker,
    make_sessionmaker,
    migrate,
)
from service.db.roles import AppRoleError, AppRoleGrants

__all__ = [
    "AppRoleError",
    "AppRoleGrants",
    "MigrationReport",
    "grant_app_role",
    "make_engine",
    "make_read_sessionmaker",
    "make_sessionmaker",
    "migrate",
]
