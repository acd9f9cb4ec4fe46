"""Alembic migrations of the conversation log store (shipped inside the package).

:func:`upgrade` brings a database to the newest revision; :class:`chatbot.store.Store`
calls it on open. From a shell: ``alembic upgrade head`` in the repository root
(``alembic.ini``; the URL comes from ``-x url=...`` or the ``CHATBOT_`` settings).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)
if logging.getLogger("alembic").level == logging.NOTSET:  # its INFO lines on every open are noise
    logging.getLogger("alembic").setLevel(logging.WARNING)

#: Folder of ``env.py`` and ``versions/``.
SCRIPT_LOCATION = Path(__file__).resolve().parent
#: Revision of the schema the pre-migration skeleton created with ``create_all``.
BASELINE = "0001"


def alembic_config(url: str | None = None):
    """An Alembic ``Config`` for this package's migrations (no ``alembic.ini`` needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision id."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    """The revision a database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _lock(engine: Engine, conn: Connection):
    """Serialise migrations of one database across processes."""
    if engine.dialect.name == "sqlite":
        db = engine.url.database
        if not db or db == ":memory:":
            yield
            return
        with open(f"{db}.migrate.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif engine.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_lock(727001)")
        try:
            yield
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(727001)")
    else:
        yield


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database of ``engine`` to ``revision``.

    A database created by the pre-migration skeleton (tables, no ``alembic_version``)
    is stamped at :data:`BASELINE` first, then upgraded.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: a migration failed (its transaction is rolled back).
    """
    from alembic import command

    head = head_revision()
    with engine.connect() as conn:
        if revision == "head" and current_revision(conn) == head:
            return
    with engine.connect() as conn:
        with _lock(engine, conn):
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            current = current_revision(conn)
            if current == head and revision == "head":
                return
            if current is None and "conversation" in inspect(conn).get_table_names():
                log.info("store: stamping a pre-migration database at %s", BASELINE)
                command.stamp(cfg, BASELINE)
                conn.commit()
            log.info("store: migrating %s from %s to %s", engine.url.render_as_string(hide_password=True),
                     current, revision)
            command.upgrade(cfg, revision)
            conn.commit()


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database of ``engine`` down to ``revision`` (``"base"`` drops everything)."""
    from alembic import command

    with engine.connect() as conn:
        with _lock(engine, conn):
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
            conn.commit()
