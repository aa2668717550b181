"""Database layer: SQLAlchemy 2 async models, engine factory and Alembic migrations."""

from service.db.engine import (
    grant_app_role,
    make_engine,
    make_read_sessionmaker,
    make_sessionmaker,
    migrate,
)

__all__ = ["grant_app_role", "make_engine", "make_read_sessionmaker", "make_sessionmaker", "migrate"]
