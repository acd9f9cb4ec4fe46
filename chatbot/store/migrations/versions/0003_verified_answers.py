"""Verified answers: how each reply was made and the generated sentences withheld from it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.add_column("message", sa.Column("answer_kind", _S(length=16), nullable=True))
    op.add_column("message", sa.Column("withheld", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("message") as b:
        b.drop_column("withheld")
        b.drop_column("answer_kind")
