"""merged customers' sends: move the sends of customers merged before this version to the customer they became

Since this version a merge moves the merged-away customer's sends to the customer it joined
(:meth:`cadence.engine.identity.IdentityResolver._persist`), so caps, spacing and exclusive
groups count both customers' sends. Sends stored before it still sit under customers merged
since: this moves them, each to the end of its ``merged_into`` chain, once. Only ids change
(no status, key or time), so the dispatcher and attribution see the same sends. Downgrading
leaves them where they are: which customer each was first stored under is not kept.

Revision ID: merge_0001
Revises: erasure_0001
Create Date: 2026-11-27 22:35:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "merge_0001"
down_revision = "erasure_0001"
branch_labels = None
depends_on = None


def roots(parents: dict[int, int]) -> dict[int, int]:
    """Each merged customer's final customer, following ``merged_into`` (``parents``) to its end.

    >>> roots({1: 2, 2: 3, 4: 3})
    {1: 3, 2: 3, 4: 3}
    """
    found: dict[int, int] = {}
    for start in parents:
        seen, node = [start], parents[start]
        while node in parents and node not in seen:  # a cycle cannot be stored; stop at one anyway
            seen.append(node)
            node = parents[node]
        for member in seen:
            found[member] = node
    return found


def upgrade() -> None:
    conn = op.get_bind()
    parents = {
        int(cid): int(into)
        for cid, into in conn.execute(
            sa.text("SELECT id, merged_into FROM customers WHERE merged_into IS NOT NULL")
        )
    }
    moves = [{"root": root, "loser": loser} for loser, root in sorted(roots(parents).items())]
    if moves:
        conn.execute(sa.text("UPDATE sends SET customer_id = :root WHERE customer_id = :loser"), moves)


def downgrade() -> None:
    pass
