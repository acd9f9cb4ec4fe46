"""Review, handoff and console: feedback, annotation, handoff, app_user, auth_session tables;
routing, redaction and idempotency columns on message; customer reference and end time on
conversation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString
_T = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "app_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", _S(length=64), nullable=False),
        sa.Column("password_hash", _S(length=255), nullable=False),
        sa.Column("role", _S(length=16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", _T(), nullable=False),
        sa.Column("last_login_at", _T(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username", name="uq_app_user_username"),
    )
    op.create_table(
        "auth_session",
        sa.Column("token_hash", _S(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", _T(), nullable=False),
        sa.Column("expires_at", _T(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["app_user.id"]),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index(op.f("ix_auth_session_expires_at"), "auth_session", ["expires_at"], unique=False)
    op.create_index(op.f("ix_auth_session_user_id"), "auth_session", ["user_id"], unique=False)
    op.create_table(
        "handoff",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", _S(length=64), nullable=False),
        sa.Column("reason", _S(length=64), nullable=False),
        sa.Column("queue", _S(length=32), nullable=False),
        sa.Column("intent", _S(length=64), nullable=True),
        sa.Column("status", _S(length=16), nullable=False),
        sa.Column("assigned_to_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _T(), nullable=False),
        sa.Column("assigned_at", _T(), nullable=True),
        sa.Column("closed_at", _T(), nullable=True),
        sa.ForeignKeyConstraint(["assigned_to_id"], ["app_user.id"]),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversation.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_handoff_conversation_id"), "handoff", ["conversation_id"], unique=False)
    op.create_index(op.f("ix_handoff_created_at"), "handoff", ["created_at"], unique=False)
    op.create_index(op.f("ix_handoff_status"), "handoff", ["status"], unique=False)
    op.create_table(
        "annotation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", _S(length=64), nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("corrected_text", sa.Text(), nullable=True),
        sa.Column("approved", sa.Boolean(), nullable=False),
        sa.Column("author_id", sa.Integer(), nullable=True),
        sa.Column("approved_by_id", sa.Integer(), nullable=True),
        sa.Column("approved_at", _T(), nullable=True),
        sa.Column("created_at", _T(), nullable=False),
        sa.Column("updated_at", _T(), nullable=False),
        sa.ForeignKeyConstraint(["approved_by_id"], ["app_user.id"]),
        sa.ForeignKeyConstraint(["author_id"], ["app_user.id"]),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversation.id"]),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("message_id", name="uq_annotation_message"),
    )
    op.create_index(op.f("ix_annotation_approved"), "annotation", ["approved"], unique=False)
    op.create_index(op.f("ix_annotation_conversation_id"), "annotation", ["conversation_id"], unique=False)
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", _S(length=64), nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", _T(), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversation.id"]),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("message_id", name="uq_feedback_message"),
    )
    op.create_index(op.f("ix_feedback_conversation_id"), "feedback", ["conversation_id"], unique=False)
    op.create_index(op.f("ix_feedback_created_at"), "feedback", ["created_at"], unique=False)

    op.add_column("conversation", sa.Column("customer_ref", _S(length=128), nullable=True))
    op.add_column("conversation", sa.Column("ended_at", _T(), nullable=True))
    op.create_index(op.f("ix_conversation_customer_ref"), "conversation", ["customer_ref"], unique=False)
    op.add_column("message", sa.Column("request_id", _S(length=64), nullable=True))
    op.add_column("message", sa.Column("intent", _S(length=64), nullable=True))
    op.add_column("message", sa.Column("confidence", sa.Float(), nullable=True))
    op.add_column("message", sa.Column("slots", sa.JSON(), nullable=True))
    op.add_column("message", sa.Column("action", _S(length=16), nullable=True))
    op.add_column("message", sa.Column("redactions", sa.JSON(), nullable=True))
    op.add_column("message", sa.Column("author_id", sa.Integer(), nullable=True))
    op.create_index(op.f("ix_message_intent"), "message", ["intent"], unique=False)
    op.create_index("uq_message_request_role", "message", ["request_id", "role"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_message_request_role", table_name="message")
    op.drop_index(op.f("ix_message_intent"), table_name="message")
    with op.batch_alter_table("message") as b:
        for col in ("author_id", "redactions", "action", "slots", "confidence", "intent", "request_id"):
            b.drop_column(col)
    op.drop_index(op.f("ix_conversation_customer_ref"), table_name="conversation")
    with op.batch_alter_table("conversation") as b:
        b.drop_column("ended_at")
        b.drop_column("customer_ref")
    for table, indexes in (
        ("feedback", ("ix_feedback_created_at", "ix_feedback_conversation_id")),
        ("annotation", ("ix_annotation_conversation_id", "ix_annotation_approved")),
        ("handoff", ("ix_handoff_status", "ix_handoff_created_at", "ix_handoff_conversation_id")),
        ("auth_session", ("ix_auth_session_user_id", "ix_auth_session_expires_at")),
        ("app_user", ()),
    ):
        for ix in indexes:
            op.drop_index(ix, table_name=table)
        op.drop_table(table)
