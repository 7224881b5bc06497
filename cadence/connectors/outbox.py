"""The ``outbox`` connector: the default dry run for every channel.

Each would-be send is recorded in the ``outbox`` table (unique by idempotency key, so a
retried dry run records once) and, when ``settings.connectors.outbox.jsonl_path`` is
set, appended to that file as one JSON object per line. It needs no credentials, so a
fresh install decides and "sends" end to end.

Ad-audience campaigns whose channel has no configured connector land here too; so does an
erased customer's removal from such an audience (customer 0, its variables say
``operation: remove``), recorded with the names of the identifiers it carried, never
their hashes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import orjson
from sqlalchemy import select

from cadence.channels import CHANNELS
from cadence.clock import now_ms
from cadence.connectors.base import (
    Capabilities,
    Connector,
    OutgoingMessage,
    SendResult,
    sha256_normalised,
)
from cadence.plugins.hookspecs import hookimpl
from cadence.settings import Settings
from cadence.store.schema.connectors import outbox

__all__ = ["Outbox", "cadence_register_connectors"]


class Outbox(Connector):
    """Records every send instead of delivering it."""

    name: ClassVar[str] = "outbox"
    channels: ClassVar[frozenset[str]] = frozenset(CHANNELS)
    capabilities: ClassVar[Capabilities] = Capabilities(
        max_batch_size=1000,
        supports_scheduling=True,
        provider_deduplicates=True,
        concurrency=1,
    )
    settings_help: ClassVar[dict[str, str]] = {
        "jsonl_path": "also append each recorded send to this JSON-lines file",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memory: list[dict[str, Any]] = []  # used when no database is given

    @classmethod
    def audience_identifiers(cls, recipient: Mapping[str, Any]) -> dict[str, str]:
        """Trimmed, lower-cased SHA-256 of email and phone: a dry run of an ad platform's identifiers.

        >>> sorted(Outbox.audience_identifiers({"email": "a@b.c", "first_name": "A"}))
        ['email_sha256']
        """
        return {
            f"{trait}_sha256": sha256_normalised(str(recipient[trait]))
            for trait in ("email", "phone")
            if recipient.get(trait)
        }

    async def send(self, batch: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Record ``batch``; every message succeeds with id ``outbox-<hash of key>``."""
        rows = [self._row(m) for m in batch]
        path = self.config.get("jsonl_path")
        fresh = await asyncio.to_thread(self._store, rows, bool(path))
        if path and fresh:
            lines = b"".join(orjson.dumps(r) + b"\n" for r in fresh)
            await asyncio.to_thread(_append, Path(path), lines)
        return [SendResult(m.idempotency_key, True, provider_message_id=_message_id(m)) for m in batch]

    def _row(self, message: OutgoingMessage) -> dict[str, Any]:
        return {
            "idempotency_key": message.idempotency_key,
            "send_id": message.send_id,
            "channel": message.channel,
            "campaign": message.campaign,
            "decision_id": message.decision_id,
            "customer_id": message.customer_id,
            "message": {
                "template": message.template,
                "variables": dict(message.variables),
                "user_id": message.user_id,
                "send_at_ms": message.send_at_ms,
                **({"identifiers": sorted(message.hashed_identifiers)} if message.hashed_identifiers else {}),
            },
            "created_ms": now_ms(),
        }

    def _store(self, rows: list[dict[str, Any]], report_fresh: bool) -> list[dict[str, Any]]:
        """Insert ``rows`` unless their key is already recorded; the new ones if ``report_fresh``."""
        if self.engine is None:
            known = {r["idempotency_key"] for r in self.memory}
            fresh = [r for r in rows if r["idempotency_key"] not in known]
            self.memory.extend(fresh)
            return fresh
        with self.engine.begin() as conn:
            fresh = rows
            if report_fresh:
                known = set(
                    conn.scalars(
                        select(outbox.c.idempotency_key).where(
                            outbox.c.idempotency_key.in_([r["idempotency_key"] for r in rows])
                        )
                    )
                )
                fresh = [r for r in rows if r["idempotency_key"] not in known]
            # Driver-level statements: the SQL compiler per row would cost more than the insert.
            columns = (
                "idempotency_key, send_id, channel, campaign, decision_id, customer_id, message, created_ms"
            )
            if fresh and conn.dialect.name == "postgresql":
                # The rows as one JSON document: cheaper to build than typed arrays.
                conn.exec_driver_sql(
                    f"INSERT INTO outbox ({columns}) SELECT {columns} FROM jsonb_to_recordset(%s::jsonb) AS v("
                    "idempotency_key text, send_id bigint, channel text, campaign text, decision_id text, "
                    "customer_id bigint, message jsonb, created_ms bigint) "
                    "ON CONFLICT (idempotency_key) DO NOTHING",
                    (orjson.dumps(fresh).decode(),),
                )
            elif fresh:
                conn.exec_driver_sql(
                    f"INSERT INTO outbox ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (idempotency_key) DO NOTHING",
                    [
                        (
                            r["idempotency_key"],
                            r["send_id"],
                            r["channel"],
                            r["campaign"],
                            r["decision_id"],
                            r["customer_id"],
                            orjson.dumps(r["message"]).decode(),
                            r["created_ms"],
                        )
                        for r in fresh
                    ],
                )
        return fresh


def _message_id(message: OutgoingMessage) -> str:
    return "outbox-" + hashlib.sha256(message.idempotency_key.encode()).hexdigest()[:24]


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write(data)


@hookimpl
def cadence_register_connectors(settings: Settings) -> list[type[Connector]]:
    """The outbox, for every channel."""
    return [Outbox]
