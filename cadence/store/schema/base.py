"""The one ``MetaData`` every table module registers on, and the column types they share.

Times are stored as integer milliseconds since the Unix epoch (UTC) in columns named
``*_ms``: portable between SQLite and PostgreSQL, cheap to compare and to bucket.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Integer, MetaData
from sqlalchemy.dialects.postgresql import JSONB

__all__ = ["Id", "Json", "JsonText", "metadata"]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

# A monotonically increasing 64-bit key; SQLite only auto-increments INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")
#: JSON kept as its text on PostgreSQL too (``json``: validated, not converted): for a document
#: that is only ever written and read whole, such as an event's payload (migration ``ingest_0003``).
JsonText = JSON()
