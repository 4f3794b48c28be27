"""Jobs keep the estimate they were admitted with, so per-owner daily ceilings are one SQL sum.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("estimated_circuits", sa.BigInteger()),
    ("estimated_shots", sa.BigInteger()),
    ("estimated_qpu_seconds", sa.Float()),
)


def upgrade() -> None:
    for name, type_ in COLUMNS:
        op.add_column("jobs", sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name, _ in COLUMNS:
            batch.drop_column(name)
