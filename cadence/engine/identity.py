"""Identity: which customer an id belongs to, following stitched merges.

Events keep the ids they came with; the ``identities`` table maps each id to a
customer, and ``customers.merged_into`` records stitching, so a late link applies to
history at read time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, select

from cadence.engine.events import LoggedEvent
from cadence.store.fast import (
    array_literal,
    execute_many,
    fetch_in,
    index_scans,
    is_postgres,
    send,
    write_rows,
)
from cadence.store.schema.core import customers, identities

__all__ = [
    "IdentityResolver",
    "canonical",
    "canonical_of",
    "customer_by_ref",
    "identities_of",
    "resolve_customer",
]


def canonical_of(parents: Mapping[int, int | None], customer_id: int) -> int:
    """Follow ``parents`` (``customer -> merged_into``) to the customer that ``customer_id`` now is.

    >>> canonical_of({3: 2, 2: 1, 1: None}, 3)
    1
    """
    seen = {customer_id}
    while (nxt := parents.get(customer_id)) is not None and nxt not in seen:
        seen.add(nxt)
        customer_id = nxt
    return customer_id


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


def customer_by_ref(conn: Connection, ref: str) -> int | None:
    """The customer behind a user id, an anonymous id or a customer number, or None.

    What an operator types (the dashboard, ``cadence explain --customer``, ``GET /v1/sends``):
    the ids :func:`resolve_customer` reads for ``POST /v1/decisions`` first, so a user id made
    of digits means that user, then the number cadence gave the customer (``customer_id`` in
    the decisions' answers). A merged customer is followed to the one it joined.
    """
    found = resolve_customer(conn, ref)
    if found is None and ref.isdigit():
        row = conn.scalar(select(customers.c.id).where(customers.c.id == int(ref)))
        found = canonical(conn, row) if row is not None else None
    return found


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


# --------------------------------------------------------------------------- stitching

IdKey = tuple[str, str]  # (kind, value)
# The user id and anonymous id of one of the loop's rows (see IdentityResolver.resolve).
_USER_ID = itemgetter(4)
_ANONYMOUS_ID = itemgetter(5)


class IdentityResolver:
    """Stitches ids into customers as the engine loop applies the log.

    Rules, applied in log order:

    * an event with ids nobody has seen creates a customer;
    * an event carrying a user id and an anonymous id links them; if they belong to
      two customers, the younger is merged into the older, unless both already carry
      (different) user ids: a shared device never merges two known people, the event
      goes to the user id's customer;
    * ``alias(previousId, userId)`` always merges: it is an explicit statement.

    Merged customers keep their row with ``merged_into`` set and their identities
    repointed, so reads follow the chain and history moves with the person. Their sends
    move too, in the same transaction: caps, spacing and exclusive groups count the sends
    stored under the customer's own id (every decision, every push), so a send an anonymous
    visitor got counts for the user they turn out to be, and no decision walks merge chains.
    """

    def __init__(self) -> None:
        #: The customers the last :meth:`resolve` created: no state anywhere counts them yet.
        self.created: frozenset[int] = frozenset()

    def resolve(
        self,
        conn: Connection,
        rows: Sequence[Any],
        *,
        apply_after: int,
        now_ms: int,
        reader: Connection | None = None,
    ) -> tuple[list[LoggedEvent], list[tuple[int, int]]]:
        """Resolve each row's customer, creating and merging for rows after ``apply_after``.

        ``rows`` are the loop's named tuples (id, message_id, type, event, user_id,
        anonymous_id, ts_ms, source, payload), in that order. Returns the events with
        their canonical customer and the ``(winner, loser)`` merges of existing customers
        made in this batch. Writes go to ``conn``; the look-ups (and on PostgreSQL the new
        customers' ids) to ``reader`` when given: another connection that already sees
        every identity ``conn``'s transaction could (the engine loop's look-ahead, which
        reads while ``conn`` is still busy with earlier, pipelined writes).
        """
        reader = conn if reader is None else reader
        # The ids to look up, per kind: sets built at C speed, not a key tuple per event.
        wanted = {"user": set(map(_USER_ID, rows)), "anonymous": set(map(_ANONYMOUS_ID, rows))}
        for ids in wanted.values():
            ids.discard(None)
            ids.discard("")
        for r in rows:
            if r[2] == "alias" and r.payload.get("previousId"):
                prev = str(r.payload["previousId"])
                wanted["user"].add(prev)
                wanted["anonymous"].add(prev)
        owner: dict[IdKey, int] = {}
        with index_scans(reader):  # the tables may have outgrown their statistics
            for kind, ids in wanted.items():
                found = fetch_in(
                    reader,
                    "SELECT value, customer_id FROM identities WHERE kind = ? AND value IN_VALUES",
                    sorted(ids),  # key order: see _persist
                    kind,
                )
                owner.update(((kind, value), cid) for value, cid in found)
            # Merges repoint identities to the surviving customer, so owners are roots.
            parent: dict[int, int] = {cid: cid for cid in owner.values()}
            # Which customers already carry a user id: the owners of user ids found above, and of
            # the other owners (of anonymous ids only) those with a user id stored.
            # By customer only: with ``kind = 'user'`` too, SQLite scans every user id instead.
            with_user: set[int] = {cid for (kind, _v), cid in owner.items() if kind == "user"}
            with_user.update(
                cid
                for cid, kind in fetch_in(
                    reader,
                    "SELECT customer_id, kind FROM identities WHERE customer_id IN_VALUES",
                    sorted(set(owner.values()) - with_user),
                )
                if kind == "user"
            )

        next_temp = -1
        new_keys: dict[IdKey, int] = {}
        merges: list[tuple[int, int, int]] = []  # (winner, loser, the event that merged them)

        def find(cid: int) -> int:
            return self._find(parent, cid)

        def lookup(key: IdKey | None) -> int | None:
            if key is None:
                return None
            cid = owner.get(key)
            return None if cid is None else find(cid)

        def create() -> int:
            nonlocal next_temp
            cid = next_temp
            next_temp -= 1
            parent[cid] = cid
            return cid

        def attach(key: IdKey, cid: int) -> None:
            owner[key] = cid
            new_keys[key] = cid
            if key[0] == "user":
                with_user.add(find(cid))

        def merge(a: int, b: int, event_id: int) -> int:
            # The older customer (a real id before a new one, then the smaller id) survives.
            winner, loser = sorted((a, b), key=lambda c: (c < 0, abs(c)))
            parent[loser] = winner
            if loser in with_user:
                with_user.add(winner)
            merges.append((winner, loser, event_id))
            return winner

        resolved: list[tuple[Any, int | None]] = []
        owner_of, parent_of = owner.get, parent.get
        for r in rows:
            ukey: IdKey | None = ("user", r.user_id) if r.user_id else None
            akey: IdKey | None = ("anonymous", r.anonymous_id) if r.anonymous_id else None
            # lookup(), inlined for the common case of an owner that is its own root
            cu, ca = owner_of(ukey), owner_of(akey)  # type: ignore[arg-type]
            if cu is not None and parent_of(cu, cu) != cu:
                cu = find(cu)
            if ca is not None and parent_of(ca, ca) != ca:
                ca = find(ca)
            if r.id > apply_after:
                if r.type == "alias" and ukey is not None and r.payload.get("previousId"):
                    prev = str(r.payload["previousId"])
                    pkey: IdKey = (
                        ("user", prev) if lookup(("user", prev)) is not None else ("anonymous", prev)
                    )
                    cp = lookup(pkey)
                    if cu is None and cp is None:
                        cu = create()
                        attach(ukey, cu)
                        attach(pkey, cu)
                    elif cu is None:
                        attach(ukey, cp)  # type: ignore[arg-type]
                        cu = cp
                    elif cp is None:
                        attach(pkey, cu)
                    elif cu != cp:
                        cu = merge(cu, cp, r.id)
                    ca = lookup(akey)
                    if akey is not None and ca is None:
                        attach(akey, cu)  # type: ignore[arg-type]
                else:
                    if cu is None and ca is None:
                        cid = create()
                        if ukey:
                            attach(ukey, cid)
                        if akey:
                            attach(akey, cid)
                        cu = cid if ukey else None
                        ca = cid if akey else None
                    elif ukey is not None and cu is None:
                        if ca in with_user:  # the device belongs to someone else: new person
                            cu = create()
                            attach(ukey, cu)
                        else:
                            attach(ukey, ca)  # type: ignore[arg-type]
                            cu = ca
                    elif akey is not None and ca is None:
                        attach(akey, cu)  # type: ignore[arg-type]
                        ca = cu
                    elif cu is not None and ca is not None and cu != ca and ca not in with_user:
                        cu = merge(cu, ca, r.id)
            resolved.append((r, cu if cu is not None else ca))

        self.created = frozenset()
        real_ids = self._persist(conn, parent, new_keys, merges, now_ms, reader)
        self.created = frozenset(real_ids.values())

        def final(cid: int | None) -> int | None:
            if cid is None:
                return None
            root = find(cid)
            return real_ids.get(root, root)

        # Positional and without LoggedEvent.__new__: this runs once per event.
        new, finals = tuple.__new__, {}
        out: list[LoggedEvent] = []
        for r, cid in resolved:
            if cid is None:
                continue
            cust = finals.get(cid)
            if cust is None:
                cust = finals[cid] = final(cid)
            out.append(
                new(
                    LoggedEvent,
                    (
                        r[0],  # by index: a third cheaper than by name, 200,000 times a batch
                        r[1],
                        r[2],
                        r[3],
                        r[4],
                        r[5],
                        cust,
                        r[6],
                        r[7],
                        r[8],
                    ),
                )
            )
        real_merges = [(final(w), loser) for w, loser, _event in merges if loser > 0]
        return out, [(w, loser) for w, loser in real_merges if w is not None]

    @staticmethod
    def _find(parent: dict[int, int], cid: int) -> int:
        root = cid
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(cid, cid) != root:  # path compression
            parent[cid], cid = root, parent[cid]
        return root

    def _persist(
        self,
        conn: Connection,
        parent: dict[int, int],
        new_keys: dict[IdKey, int],
        merges: list[tuple[int, int, int]],
        now_ms: int,
        reader: Connection | None = None,
    ) -> dict[int, int]:
        """Write new customers, identities and merges; map temporary ids to real ones.

        A merge repoints the loser's identities and sends to the winner (see the class) and
        records the event that made it (``merged_at_event``, where the learners fold it). The
        sends keep their idempotency keys (the loser's id in one is never read back, and a
        provider that deduplicates may have seen it) and ``updated_ms`` (the dispatcher reads it
        as the version of a row it claims, and as the time a round claimed it).
        """
        roots = sorted({c for c in parent if c < 0 and self._find(parent, c) == c}, reverse=True)
        real: dict[int, int] = {}
        if roots:
            # A sequence is outside transactions: on PostgreSQL the reader may draw the ids.
            created = _reserve_customer_ids(
                reader if reader is not None and is_postgres(conn) else conn, len(roots)
            )
            write_rows(
                conn,
                "customers",
                (("id", "bigint"), ("created_ms", "bigint")),
                [(c, now_ms) for c in created],
            )
            real = dict(zip(roots, created, strict=True))
        moves = []
        for winner, loser, event_id in merges:
            if loser < 0:
                continue
            target = self._find(parent, winner)
            moves.append((real.get(target, target), loser, event_id))
        # Losers are distinct and never a target (targets are roots): order does not matter.
        # The sends' move comes after ``merged_into``'s: on PostgreSQL that update locks the loser's
        # row, which a commit deciding for the loser holds (FOR UPDATE) until its send is committed,
        # so the move, a later statement, sees that send. Nothing runs without merges.
        if moves and is_postgres(conn):  # one statement each, not one round trip per merge
            pairs = (
                array_literal("bigint", [w for w, _, _ in moves]),
                array_literal("bigint", [lo for _, lo, _ in moves]),
            )
            # ``= ANY(losers)`` as well: without it the planner joins by scanning the whole table,
            # and no sequential scan even so: the tables may have outgrown their statistics.
            with index_scans(conn):
                send(
                    conn,
                    "UPDATE customers SET merged_into = m.w, merged_at_event = m.e"
                    " FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS m(w, l, e)"
                    " WHERE customers.id = m.l AND customers.id = ANY(%s::bigint[])",
                    (*pairs, array_literal("bigint", [e for _, _, e in moves]), pairs[1]),
                )
                send(
                    conn,
                    "UPDATE identities SET customer_id = m.w FROM unnest(%s::bigint[], %s::bigint[]) AS m(w, l)"
                    " WHERE identities.customer_id = m.l AND identities.customer_id = ANY(%s::bigint[])",
                    (*pairs, pairs[1]),
                )
                send(
                    conn,
                    "UPDATE sends SET customer_id = m.w FROM unnest(%s::bigint[], %s::bigint[]) AS m(w, l)"
                    " WHERE sends.customer_id = m.l AND sends.customer_id = ANY(%s::bigint[])",
                    (*pairs, pairs[1]),
                )
        else:
            execute_many(
                conn,
                "UPDATE customers SET merged_into = ?, merged_at_event = ? WHERE id = ?",
                [(w, e, lo) for w, lo, e in moves],
            )
            repoint = [(w, lo) for w, lo, _ in moves]
            execute_many(conn, "UPDATE identities SET customer_id = ? WHERE customer_id = ?", repoint)
            execute_many(conn, "UPDATE sends SET customer_id = ? WHERE customer_id = ?", repoint)
        if new_keys:
            rows = []
            for (kind, value), cid in new_keys.items():
                root = self._find(parent, cid)
                rows.append((kind, value, real.get(root, root), now_ms))
            rows.sort()  # in key order: the inserts walk the b-tree where the previous one left it
            write_rows(
                conn,
                "identities",
                (("kind", "text"), ("value", "text"), ("customer_id", "bigint"), ("first_seen_ms", "bigint")),
                rows,
            )
        return real


def _reserve_customer_ids(conn: Connection, count: int) -> list[int]:
    """``count`` fresh customer ids, without a round trip per row.

    PostgreSQL draws them from the column's sequence; on SQLite the loop's batch
    holds the write lock (``BEGIN IMMEDIATE``), so the ids after the maximum are free: the
    maximum of the table and of the last erasure's ``customer_ids_to``.
    """
    if conn.dialect.name == "postgresql":
        # The sequence is looked up once, not per row (that lookup cost more than nextval).
        rows = conn.exec_driver_sql(
            "WITH s AS MATERIALIZED (SELECT pg_get_serial_sequence('customers', 'id')::regclass AS seq)"
            " SELECT nextval(s.seq) FROM s, generate_series(1, %s)",
            (count,),
        )
        return [int(r[0]) for r in rows]
    # Not below an erased customer's id either (erasure deletes the row that held the maximum).
    start = int(
        conn.exec_driver_sql(
            "SELECT max(COALESCE((SELECT MAX(id) FROM customers), 0),"
            " COALESCE((SELECT customer_ids_to FROM erasures ORDER BY id DESC LIMIT 1), 0))"
        ).scalar()
        or 0
    )
    return list(range(start + 1, start + count + 1))
