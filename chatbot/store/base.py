"""The store's read and write plumbing: sessions, transactions, retries of transient failures.

Every read and write of :class:`chatbot.store.Store` runs through :meth:`StoreBase._read` or
:meth:`StoreBase._write`: a write is one transaction, committed whole or not at all, retried with
backoff when it fails for a transient reason (a locked SQLite file, a PostgreSQL serialisation
failure or deadlock, a dropped connection); database errors reach callers as
:class:`~chatbot.errors.StoreError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import func
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session, SQLModel, select

from chatbot.errors import InvalidInputError, NotFoundError, StoreError
from chatbot.store.schema import open_engine

log = logging.getLogger("chatbot.store")

T = TypeVar("T")

#: Words of a database error that a retry may cure.
TRANSIENT = ("database is locked", "database is busy", "could not serialize", "deadlock detected",
             "server closed the connection", "connection refused", "terminating connection")


def _is_transient(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, OperationalError) and any(s in msg for s in TRANSIENT)


class StoreBase:
    """An open database with transactional reads and retried writes (the base of :class:`chatbot.store.Store`).

    Args:
        url: SQLAlchemy URL (``sqlite:///path.db`` or ``postgresql+psycopg://...``).
        migrate: bring the schema to the newest migration on open (default).
        retries: attempts of a write that fails transiently (locked database, dropped connection).

    Raises:
        StoreError: the database cannot be opened or migrated.
    """

    def __init__(self, url: str, migrate: bool = True, retries: int = 4) -> None:
        self.url = url
        self.retries = max(1, retries)
        self.is_sqlite = url.startswith("sqlite")
        self.engine = open_engine(url, migrate=migrate)

    def session(self) -> Session:
        """A new session (objects stay readable after commit)."""
        return Session(self.engine, expire_on_commit=False)

    def _write(self, what: str, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in a transaction, committing; retry transient failures with backoff
        (50 ms, then four times longer each try).

        Raises:
            StoreError: the write failed (nothing of it was committed).
            NotFoundError, InvalidInputError: raised by ``fn`` (nothing committed, no retry).
        """
        delay = 0.05
        for attempt in range(1, self.retries + 1):
            try:
                with self.session() as s:
                    out = fn(s)
                    s.commit()
                    return out
            except (NotFoundError, InvalidInputError):
                raise
            except SQLAlchemyError as exc:
                if attempt < self.retries and _is_transient(exc):
                    log.warning("store: %s failed (%s); retry %d", what, type(exc).__name__, attempt)
                    time.sleep(delay)
                    delay *= 4
                    continue
                raise StoreError(f"cannot {what}: {exc}") from exc
        raise AssertionError("unreachable")

    def _read(self, what: str, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in a read-only use of a session.

        Raises:
            StoreError: the read failed.
        """
        try:
            with self.session() as s:
                return fn(s)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot {what}: {exc}") from exc

    def count(self, model: type[SQLModel]) -> int:
        """Rows in the table of ``model``."""
        return self._read("count", lambda s: int(s.exec(select(func.count()).select_from(model)).one()))

    def integrity_check(self) -> str:
        """``"ok"`` when the database is consistent (SQLite ``PRAGMA integrity_check``; PostgreSQL: a
        read of every table), else the problems found."""
        with self.engine.connect() as c:
            if self.is_sqlite:
                rows = c.exec_driver_sql("PRAGMA integrity_check").fetchall()
                fk = c.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                out = "; ".join(str(r[0]) for r in rows)
                return out if not fk else f"{out}; foreign key violations: {fk[:5]}"
            for t in SQLModel.metadata.sorted_tables:
                c.execute(select(func.count()).select_from(t))
            return "ok"

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()


__all__ = ["StoreBase", "TRANSIENT"]
