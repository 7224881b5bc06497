"""Autogenerate an Alembic revision: ``python scripts/new_migration.py MESSAGE REV_ID``.

It builds a scratch SQLite database at the current heads and diffs it against
``cadence.store.schema.metadata``. Review the file it writes before committing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command

from cadence.store.db import _alembic_config, create_db_engine, migrate


def main() -> None:
    message, rev_id = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_db_engine(f"sqlite:///{Path(tmp) / 'scratch.db'}")
        migrate(engine)
        script = command.revision(_alembic_config(engine), message=message, autogenerate=True, rev_id=rev_id)
    # Alembic renders JSONB(astext_type=Text()) without the sa. prefix it imports.
    for item in script if isinstance(script, list) else [script]:
        if item is not None:
            path = Path(item.path)
            path.write_text(path.read_text().replace("astext_type=Text()", "astext_type=sa.Text()"))


if __name__ == "__main__":
    main()
