"""Alembic migrations of the job store (run them with `service.store.migrate`)."""
