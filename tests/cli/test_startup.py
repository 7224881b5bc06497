"""Start-up: a command loads only what it needs, and a current database skips Alembic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from cadence.store.db import MIGRATIONS, _script_heads, create_db_engine, migrate, pending_migrations

ROOT = Path(__file__).resolve().parents[2]


def loaded_after(code: str) -> set[str]:
    probe = (
        "import sys\n"
        f"{code}\n"
        "print('LOADED', *(m for m in ('fastapi', 'numpy', 'alembic', 'cadence.dsl', 'sqlalchemy')"
        " if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return set(next(line for line in out.splitlines() if line.startswith("LOADED")).split()[1:])


def import_code(url: str, path: Path) -> str:
    return (
        "from cadence.cli import main\n"
        "try:\n"
        f"    main(['--database-url', {url!r}, 'import', {str(path)!r}])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code"
    )


def test_import_command_does_not_load_the_web_stack_alembic_or_sqlalchemy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    migrate(create_db_engine(url))
    empty = tmp_path / "empty.ndjson"
    empty.write_bytes(b"")
    assert loaded_after(import_code(url, empty)) == set()


def test_import_into_a_database_behind_the_scripts_migrates_it_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = create_db_engine(url)
    migrate(engine, "0002")
    path = tmp_path / "one.ndjson"
    path.write_bytes(b'{"type":"track","event":"E","userId":"u1","messageId":"m1"}\n')
    assert {"alembic", "sqlalchemy"} <= loaded_after(import_code(url, path))  # the runtime's path
    assert pending_migrations(engine) == []
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT message_id FROM events").scalars().all() == ["m1"]
    engine.dispose()


def test_help_still_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cadence", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    for command in ("import", "serve", "attribution", "check", "models"):
        assert command in out


def test_script_heads_agree_with_alembic() -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert _script_heads() == frozenset(ScriptDirectory.from_config(config).get_heads())


def test_a_database_behind_the_scripts_is_still_upgraded(sqlite_engine: Engine, tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path}/old.db")
    migrate(engine, "0002")
    assert pending_migrations(engine)
    migrate(engine)
    assert pending_migrations(engine) == []
    assert pending_migrations(sqlite_engine) == []
    engine.dispose()
