"""login health: how the worker's last IMAP / SMTP login went, per mailbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 19:48:11.822031
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel

import helpdesk.models
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "login_state",
        sa.Column("service", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column("mailbox", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("auth", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("failing_since", helpdesk.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_ok_at", helpdesk.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_failure_at", helpdesk.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
        sa.Column("worker_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("updated_at", helpdesk.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("service", "mailbox", name=op.f("pk_login_state")),
    )


def downgrade() -> None:
    op.drop_table("login_state")
