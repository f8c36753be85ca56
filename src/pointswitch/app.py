"""Wiring: configuration -> database -> ledger -> router -> switch."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import asyncpg
import structlog

from .codecs import dialect, framing
from .config import WORKER_ENV, Config, ListenerConfig
from .ledger import ExpiryRule, GroupCommit, Ledger, Operation, UsageRule, days
from .ledger.database import (
    CONNECT_ERRORS,
    DatabaseStartError,
    EmbeddedServer,
    connect_failure,
    create_pool,
    dsn_target,
    migrate,
)
from .ledger.identity import IdentityBlocks
from .ledger.saf import ReversalQueue
from .ledger.scheduler import DayCloser
from .ledger.vault import Vault, VaultError, generate_key_file, parse_master_key, read_key_file
from .messages import Messenger
from .routing import ListenerPolicy, Router
from .switch import FrameHandler, Listener, Switch
from .switch.forwarder import ReversalForwarder
from .switch.guard import PeerGuard
from .switch.health import DatabaseHealth
from .switch.upstream import Connector
from .web import WebServer, WebServices

log = structlog.get_logger("pointswitch")


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def resolve_dsn(config: Config) -> tuple[str, EmbeddedServer | None]:
    """The configured DSN, or an embedded server's (started here, before any loop).
    Raises DatabaseStartError when the embedded server does not start."""
    if config.database.dsn:
        return config.database.dsn, None
    embedded = EmbeddedServer(config.data_dir)
    dsn = embedded.start()
    log.info("embedded PostgreSQL ready", data_dir=str(config.data_dir))
    return dsn, embedded


def resolve_vault(config: Config, *, embedded: bool, env: dict[str, str] | None = None) -> Vault:
    """The operator's master key: POINTSWITCH_MASTER_KEY, else [security] master_key_file;
    on the embedded database with neither, one generated into the data folder. An
    external database with no master key is refused."""
    env = dict(os.environ) if env is None else env
    if env.get("POINTSWITCH_MASTER_KEY"):
        return Vault(parse_master_key(env["POINTSWITCH_MASTER_KEY"]))
    if config.security.master_key_file:
        return Vault(read_key_file(Path(config.security.master_key_file).expanduser()))
    if not embedded:
        raise VaultError(
            "an external database needs the operator's master key: set POINTSWITCH_MASTER_KEY (hex)"
            " or [security] master_key_file"
        )
    path = config.data_dir / "master.key"
    if path.exists():
        return Vault(read_key_file(path))
    key = generate_key_file(path)
    log.warning("generated a master key for the embedded database; production needs its own",
                path=str(path))
    return Vault(key)


def listener_policy(lc: ListenerConfig) -> ListenerPolicy:
    if lc.mac_method == "off":
        log.warning("UNAUTHENTICATED LISTENER: anyone who reaches it can act as any terminal whose profile"
                    " has mac = off; for test rigs on loopback only", listener=lc.name, host=lc.host, port=lc.port)
    return ListenerPolicy(lc.name, lc.dialect, lc.mac_method)


@contextlib.asynccontextmanager
async def database(config: Config, dsn: str, vault: Vault) -> AsyncIterator[asyncpg.Pool]:
    """The pool of a migrated database whose master key is ``vault``'s, with the
    vault's data keys loaded."""
    db = config.database
    try:
        pool = await create_pool(dsn, min_size=db.pool_min_size, max_size=db.pool_max_size,
                                 command_timeout_s=db.command_timeout_s, connect_timeout_s=db.connect_timeout_s)
    except CONNECT_ERRORS as exc:  # one line naming the server, never the password
        raise connect_failure(dsn, exc, db.connect_timeout_s) from exc
    try:
        async with pool.acquire() as con:
            try:
                applied = await migrate(con, vault)
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise DatabaseStartError(f"migrating the database ({dsn_target(dsn)}) failed: {exc}") from exc
            await vault.check_database(con)
            await vault.load_data_keys(con)
        if applied:
            log.info("migrations applied", migrations=applied)
        yield pool
    finally:
        await pool.close()


@dataclass
class Running:
    switch: Switch
    ledger: Ledger
    pool: asyncpg.Pool
    connectors: dict[str, Connector]
    forwarder: ReversalForwarder
    closer: DayCloser
    web: WebServer | None = None
    messenger: Messenger | None = None  # delivers the outbox ([messages] enabled)

    def address(self, listener: str) -> tuple[str, int]:
        host, port = self.switch.bound[listener]
        return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), port


@contextlib.asynccontextmanager
async def running_switch(config: Config, dsn: str, vault: Vault) -> AsyncIterator[Running]:
    policies = {lc.name: listener_policy(lc) for lc in config.listeners}
    sec = config.security
    async with database(config, dsn, vault) as pool:
        usage = {
            Operation.CASH_OUT: config.cash_out, Operation.INSURANCE: config.insurance,
        }
        rules = {op: UsageRule(Decimal(u.points_per_yuan), u.fee_points, u.min_amount_fen, u.daily_limit_fen)
                 for op, u in usage.items()}
        ledger = Ledger(pool, vault, max_pin_tries=sec.max_pin_tries, usage=rules,
                        pin_workers=sec.pin_workers or os.cpu_count() or 1,
                        max_pending_sign_ons=sec.max_pending_sign_ons, pending_keys_ttl_s=sec.pending_keys_ttl_s,
                        session_cache_size=sec.session_cache_size,
                        acquire_timeout_s=config.database.command_timeout_s,
                        expiry=ExpiryRule(config.expiry.policy, config.expiry.months, config.expiry.years),
                        group_commit=GroupCommit(config.database.group_commit_writers,
                                                 config.database.group_commit_max_batch,
                                                 config.limits.max_requests_in_flight))
        await ledger.start(lambda: asyncpg.connect(dsn, timeout=config.database.command_timeout_s))
        async with pool.acquire() as con:  # the database's calendar follows the settings
            await days.set_calendar(con, config.day.cutoff_time(), config.day.time_zone)
        closer = DayCloser(pool, ledger, grace_s=config.day.close_grace_s, interval_s=config.day.check_interval_s,
                           clearing_dir=config.clearing_dir, lock_timeout_ms=config.day.cutoff_lock_timeout_ms,
                           attempts=config.day.cutoff_attempts)
        guard = PeerGuard(sec, config.limits)
        health = DatabaseHealth()
        queue = ReversalQueue(ledger)
        forwarder = ReversalForwarder(queue, {})
        identities = IdentityBlocks(pool)  # 11 and 37 upstream: unique across processes and restarts
        connectors = {c.name: Connector(c, on_late=forwarder.on_late, identities=identities.next)
                      for c in config.connectors}
        forwarder.connectors = dict(connectors)
        router = Router(ledger, {op: connectors[u.connector] for op, u in usage.items() if u.connector in connectors},
                        guard)
        for connector in connectors.values():
            connector.start()
        forwarder.start()
        if config.day.auto_close:
            closer.start()
        messenger = None
        if config.messages.enabled:  # in every process: SKIP LOCKED shares the outbox between them
            messenger = Messenger(pool, vault, config.messages, time_zone=config.day.time_zone,
                                  connect=lambda: asyncpg.connect(dsn, timeout=config.database.command_timeout_s))
            await messenger.start()
        listeners = [
            Listener(
                name=lc.name, host=lc.host, port=lc.port, framing=framing(lc.framing),
                handler=FrameHandler(policies[lc.name], dialect(lc.dialect), router,
                                     config.limits.request_timeout_s, commit_wait_s=config.limits.commit_wait_s,
                                     health=health),
            )
            for lc in config.listeners
        ]
        switch = Switch(listeners, config.limits, guard, reuse_port=config.workers > 1)
        web = None
        if config.http.enabled and os.environ.get(WORKER_ENV, "0") == "0":  # one worker serves the web layer
            web = WebServer(WebServices(config, pool, ledger, {"connectors": connectors, "forwarder": forwarder,
                                                               "closer": closer}))
        try:
            await switch.start()
            if web is not None:
                await web.start()
            try:
                yield Running(switch, ledger, pool, connectors, forwarder, closer, web, messenger)
            finally:
                if web is not None:
                    await web.stop()
                await switch.stop()
        finally:
            if messenger is not None:
                await messenger.stop()
            await closer.stop()
            await forwarder.stop()
            for connector in connectors.values():
                await connector.stop()
            await ledger.stop()


async def serve(config: Config, dsn: str, vault: Vault) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.metrics.port and os.environ.get(WORKER_ENV, "0") == "0":  # one worker serves the metrics
        import prometheus_client

        prometheus_client.start_http_server(config.metrics.port, addr=config.metrics.host)
        log.info("metrics served", host=config.metrics.host, port=config.metrics.port, path="/metrics")
    async with running_switch(config, dsn, vault):
        log.info("switch running", listeners=len(config.listeners), pid=os.getpid())
        await stop.wait()
        log.info("stopping: no new connections, finishing requests in flight")
    log.info("stopped")
