"""The database schema: one ``metadata``, one module per domain; Alembic mirrors it.

Importing this package registers every table. A new domain adds a module here, imports
it below, and adds an Alembic revision under ``cadence/store/migrations/versions``.
"""

from __future__ import annotations

from cadence.store.schema import attribution, connectors, core, dashboard, decisions, scheduler, sends
from cadence.store.schema.base import metadata

__all__ = ["attribution", "connectors", "core", "dashboard", "decisions", "metadata", "scheduler", "sends"]
