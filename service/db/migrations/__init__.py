"""Alembic migrations for the CareCanvas database."""
