"""Alembic migrations of the Conveyor schema (`conveyor migrate` applies them)."""
