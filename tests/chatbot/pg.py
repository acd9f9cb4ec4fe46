"""Database fixtures for the store tests: a temporary SQLite file, and a fresh database on a real
PostgreSQL server.

PostgreSQL comes from ``CHATBOT_TEST_POSTGRES_URL`` (a SQLAlchemy URL of a role that may create
databases, e.g. ``postgresql+psycopg://chatbot_test:chatbot_test@127.0.0.1:5432/postgres``);
``make test`` starts the local Debian cluster and sets it (``.ci/test-postgres.sh``). Without it the
PostgreSQL cases skip, or fail when ``CHATBOT_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

SKIP_REASON = ("CHATBOT_TEST_POSTGRES_URL is not set: no PostgreSQL server for the store tests "
               "(`make test` starts the local Debian cluster and sets it)")


def postgres_server_url() -> str | None:
    """The test server URL, or None (skip) / a test failure (``CHATBOT_REQUIRE_POSTGRES=1``)."""
    url = os.environ.get("CHATBOT_TEST_POSTGRES_URL", "").strip()
    if url:
        return url
    if os.environ.get("CHATBOT_REQUIRE_POSTGRES") == "1":
        pytest.fail("CHATBOT_REQUIRE_POSTGRES=1 but " + SKIP_REASON)
    return None


@contextlib.contextmanager
def temp_database(server_url: str):
    """Create an empty database on the server, yield its SQLAlchemy URL, drop it afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(server_url)
    name = f"chatbot_test_{uuid.uuid4().hex[:12]}"
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A SQLAlchemy URL of an empty database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    server = postgres_server_url()
    if server is None:
        pytest.skip(SKIP_REASON)
    with temp_database(server) as url:
        yield url


@pytest.fixture
def store(db_url):
    """A migrated :class:`chatbot.store.Store` on ``db_url``."""
    from chatbot.store import Store

    s = Store(db_url)
    yield s
    s.close()
