"""Identity: which customer an id belongs to, following stitched merges.

Events keep the ids they came with; the ``identities`` table maps each id to a
customer, and ``customers.merged_into`` records stitching, so a late link applies to
history at read time.
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from cadence.store.schema.core import customers, identities

__all__ = ["canonical", "identities_of", "resolve_customer"]


def canonical(conn: Connection, customer_id: int) -> int:
    """Follow ``merged_into`` to the customer that ``customer_id`` now belongs to."""
    seen = {customer_id}
    while True:
        nxt = conn.scalar(select(customers.c.merged_into).where(customers.c.id == customer_id))
        if nxt is None or nxt in seen:
            return customer_id
        seen.add(nxt)
        customer_id = nxt


def resolve_customer(conn: Connection, ref: str) -> int | None:
    """The customer behind a user id or an anonymous id (user ids win), or None."""
    for kind in ("user", "anonymous"):
        found = conn.scalar(
            select(identities.c.customer_id).where(identities.c.kind == kind, identities.c.value == ref)
        )
        if found is not None:
            return canonical(conn, found)
    return None


def identities_of(conn: Connection, customer_id: int) -> list[tuple[str, str]]:
    """Every (kind, value) that resolves to ``customer_id``, merged customers included."""
    members = [customer_id]
    frontier = [customer_id]
    while frontier:
        rows = conn.scalars(select(customers.c.id).where(customers.c.merged_into.in_(frontier))).all()
        frontier = [r for r in rows if r not in members]
        members.extend(frontier)
    return [
        (kind, value)
        for kind, value in conn.execute(
            select(identities.c.kind, identities.c.value)
            .where(identities.c.customer_id.in_(members))
            .order_by(identities.c.kind, identities.c.value)
        )
    ]
