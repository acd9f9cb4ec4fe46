"""Alembic migrations: the migrated schema, column by column, on SQLite and PostgreSQL; it matches
the SQLModel tables; a database made by the pre-migration skeleton is upgraded in place."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from chatbot.store.migrations import current_revision, downgrade, head_revision, upgrade
from chatbot.store import Message, SQLModel, Store
from tests.chatbot.pg import db_url  # noqa: F401  (fixture)

# table -> [(column, kind, nullable)] in table order; kind: str<N> | text | int | float | bool | time | json
EXPECTED = {
    "conversation": [
        ("id", "str64", False), ("channel", "str32", False), ("status", "str16", False), ("started_at", "time", False),
        ("updated_at", "time", False), ("customer_ref", "str128", True), ("ended_at", "time", True),
    ],
    "message": [
        ("id", "int", False), ("conversation_id", "str64", False), ("role", "str16", False), ("text", "str", False),
        ("created_at", "time", False), ("chunk_ids", "json", True), ("chunk_scores", "json", True),
        ("citations", "json", True), ("model", "str256", True), ("engine", "str32", True),
        ("adapter_version", "str128", True), ("index_version", "str64", True), ("finish_reason", "str16", True),
        ("latency_ms", "float", True), ("ttft_ms", "float", True), ("prompt_tokens", "int", True),
        ("completion_tokens", "int", True), ("request_id", "str64", True), ("intent", "str64", True),
        ("confidence", "float", True), ("slots", "json", True), ("action", "str16", True),
        ("redactions", "json", True), ("author_id", "int", True), ("answer_kind", "str16", True), ("withheld", "json", True),
    ],
    "feedback": [
        ("id", "int", False), ("conversation_id", "str64", False), ("message_id", "int", False),
        ("rating", "int", False), ("comment", "text", True), ("created_at", "time", False),
    ],
    "annotation": [
        ("id", "int", False), ("conversation_id", "str64", False), ("message_id", "int", False),
        ("corrected_text", "text", True), ("approved", "bool", False), ("author_id", "int", True),
        ("approved_by_id", "int", True), ("approved_at", "time", True), ("created_at", "time", False),
        ("updated_at", "time", False),
    ],
    "handoff": [
        ("id", "int", False), ("conversation_id", "str64", False), ("reason", "str64", False),
        ("queue", "str32", False), ("intent", "str64", True), ("status", "str16", False),
        ("assigned_to_id", "int", True), ("created_at", "time", False), ("assigned_at", "time", True),
        ("closed_at", "time", True),
    ],
    "app_user": [
        ("id", "int", False), ("username", "str64", False), ("password_hash", "str255", False),
        ("role", "str16", False), ("active", "bool", False), ("created_at", "time", False),
        ("last_login_at", "time", True),
    ],
    "auth_session": [
        ("token_hash", "str64", False), ("user_id", "int", False), ("created_at", "time", False),
        ("expires_at", "time", False),
    ],
}
EXPECTED_FKS = {
    ("message", "conversation_id", "conversation", "id"), ("feedback", "conversation_id", "conversation", "id"),
    ("feedback", "message_id", "message", "id"), ("annotation", "conversation_id", "conversation", "id"),
    ("annotation", "message_id", "message", "id"), ("annotation", "author_id", "app_user", "id"),
    ("annotation", "approved_by_id", "app_user", "id"), ("handoff", "conversation_id", "conversation", "id"),
    ("handoff", "assigned_to_id", "app_user", "id"), ("auth_session", "user_id", "app_user", "id"),
}
EXPECTED_UNIQUE = {("app_user", ("username",)), ("feedback", ("message_id",)), ("annotation", ("message_id",)),
                   ("message", ("request_id", "role"))}


def _kind(t: sa.types.TypeEngine) -> str:
    name = type(t).__name__.upper()
    if isinstance(t, sa.Boolean) or name == "BOOLEAN":
        return "bool"
    if isinstance(t, (sa.DateTime, sa.TIMESTAMP)) or "TIME" in name:
        return "time"
    if isinstance(t, sa.JSON) or "JSON" in name:
        return "json"
    if isinstance(t, (sa.Float, sa.Numeric)) or name in ("REAL", "DOUBLE_PRECISION", "DOUBLE"):
        return "float"
    if isinstance(t, sa.Integer):
        return "int"
    if isinstance(t, sa.Text) and not isinstance(t, sa.String) or name == "TEXT":
        return "text"
    if isinstance(t, sa.String):
        return f"str{t.length or ''}"
    return name


def test_migrated_schema_column_by_column(db_url):
    store = Store(db_url)
    try:
        insp = sa.inspect(store.engine)
        tables = set(insp.get_table_names())
        assert tables == set(EXPECTED) | {"alembic_version"}
        for table, cols in EXPECTED.items():
            got = [(c["name"], _kind(c["type"]), c["nullable"]) for c in insp.get_columns(table)]
            # SQLite reports VARCHAR without length the same way as TEXT
            if store.is_sqlite:
                got = [(n, "str" if k == "text" and (n, "str", nl) in cols else k, nl) for n, k, nl in got]
            assert got == cols, f"{table}: {got}"
        pks = {t: tuple(insp.get_pk_constraint(t)["constrained_columns"]) for t in EXPECTED}
        assert pks == {t: ("token_hash",) if t == "auth_session" else ("id",) for t in EXPECTED}
        fks = {(t, fk["constrained_columns"][0], fk["referred_table"], fk["referred_columns"][0])
               for t in EXPECTED for fk in insp.get_foreign_keys(t)}
        assert fks == EXPECTED_FKS
        uniques = {(t, tuple(u["column_names"])) for t in EXPECTED for u in insp.get_unique_constraints(t)}
        uniques |= {(t, tuple(i["column_names"])) for t in EXPECTED for i in insp.get_indexes(t) if i["unique"]}
        assert EXPECTED_UNIQUE <= uniques
        indexed = {(t, i["column_names"][0]) for t in EXPECTED for i in insp.get_indexes(t)}
        for col in [("message", "conversation_id"), ("message", "created_at"), ("message", "intent"),
                    ("conversation", "started_at"), ("handoff", "status"), ("feedback", "conversation_id")]:
            assert col in indexed
        with store.engine.connect() as c:
            assert current_revision(c) == head_revision() == "0003"
    finally:
        store.close()


def test_migrations_match_the_models(db_url):
    """Alembic's autogenerate finds nothing to change between the migrated database and the tables."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    store = Store(db_url)
    try:
        with store.engine.connect() as c:
            diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), SQLModel.metadata)
        assert diff == []
    finally:
        store.close()


def test_downgrade_to_base_and_up_again(db_url):
    store = Store(db_url)
    downgrade(store.engine, "0001")
    insp = sa.inspect(store.engine)
    assert set(insp.get_table_names()) == {"conversation", "message", "alembic_version"}
    assert "intent" not in {c["name"] for c in insp.get_columns("message")}
    downgrade(store.engine, "base")
    assert set(sa.inspect(store.engine).get_table_names()) == {"alembic_version"}
    upgrade(store.engine)
    assert "handoff" in sa.inspect(store.engine).get_table_names()
    store.close()


SKELETON_SQLITE = [
    """CREATE TABLE conversation (id VARCHAR(64) NOT NULL, channel VARCHAR(32) NOT NULL, status VARCHAR(16) NOT NULL,
    started_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, PRIMARY KEY (id))""",
    "CREATE INDEX ix_conversation_started_at ON conversation (started_at)",
    """CREATE TABLE message (id INTEGER NOT NULL, conversation_id VARCHAR(64) NOT NULL, role VARCHAR(16) NOT NULL,
    text VARCHAR NOT NULL, created_at DATETIME NOT NULL, chunk_ids JSON, chunk_scores JSON, citations JSON,
    model VARCHAR(256), engine VARCHAR(32), adapter_version VARCHAR(128), index_version VARCHAR(64),
    finish_reason VARCHAR(16), latency_ms FLOAT, ttft_ms FLOAT, prompt_tokens INTEGER, completion_tokens INTEGER,
    PRIMARY KEY (id), FOREIGN KEY(conversation_id) REFERENCES conversation (id))""",
    "CREATE INDEX ix_message_conversation_id ON message (conversation_id)",
    "CREATE INDEX ix_message_created_at ON message (created_at)",
    "INSERT INTO conversation VALUES ('c1', 'web', 'bot', '2026-01-01 10:00:00.000000', '2026-01-01 10:00:05.000000')",
    """INSERT INTO message (id, conversation_id, role, text, created_at, chunk_ids) VALUES
    (1, 'c1', 'user', 'old question', '2026-01-01 10:00:00.000000', NULL),
    (2, 'c1', 'assistant', 'old answer', '2026-01-01 10:00:05.000000', '["3", "9"]')""",
]


def test_a_skeleton_database_is_upgraded_in_place(tmp_path):
    """A database the walking skeleton made with create_all (no alembic_version) keeps its rows."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    eng = sa.create_engine(url)
    with eng.begin() as c:
        for stmt in SKELETON_SQLITE:
            c.exec_driver_sql(stmt)
    eng.dispose()
    store = Store(url)
    msgs = store.messages("c1")
    assert [(m.role, m.text, m.chunk_ids, m.intent) for m in msgs] == [
        ("user", "old question", None, None), ("assistant", "old answer", ["3", "9"], None)]
    assert msgs[0].created_at.year == 2026
    store.add_message(Message(conversation_id="c1", role="user", text="new", intent="greeting"))
    assert store.count(Message) == 3
    with store.engine.connect() as c:
        assert current_revision(c) == "0003"
    assert store.integrity_check() == "ok"
    store.close()


def test_opening_a_migrated_database_again_is_cheap_and_changes_nothing(tmp_path):
    import time

    url = f"sqlite:///{tmp_path / 'a.db'}"
    Store(url).close()
    t = time.perf_counter()
    s = Store(url)
    assert time.perf_counter() - t < 2.0
    with s.engine.connect() as c:
        assert current_revision(c) == "0003"
    s.close()


def test_an_unopenable_store_raises_store_error_naming_the_url(tmp_path):
    from chatbot.errors import StoreError

    (tmp_path / "afile").write_text("x")
    url = f"sqlite:///{tmp_path / 'afile' / 'x.db'}"
    with pytest.raises(StoreError, match="cannot open the store at .*afile/x.db"):
        Store(url)
    with pytest.raises(StoreError, match="cannot open the store at 'postgresql"):
        Store("postgresql+psycopg://nobody:wrong@127.0.0.1:1/none")
