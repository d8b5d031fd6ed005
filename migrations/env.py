"""Alembic environment: runs migrations on the connection ``hub.registry.database`` hands over.

Online only. With no connection in ``config.attributes`` (alembic's own command line), an engine is made from
the ``sqlalchemy.url`` option with the hub's SQLite settings.
"""

from __future__ import annotations

from alembic import context

from hub.registry.database import make_engine
from hub.registry.models import Model


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Model.metadata,
        # SQLite cannot ALTER most things: later migrations rebuild tables in batches there.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as own_connection:
            run(own_connection)
    finally:
        engine.dispose()
