"""Alembic migrations of the registry schema; configured from code by ``hub.registry.database.alembic_config``."""
