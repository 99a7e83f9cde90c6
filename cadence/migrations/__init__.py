"""Alembic migrations of the store's schema; `cadence migrate` and every start apply them."""
