"""Wiring: configuration -> database -> ledger -> router -> switch."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import structlog

from .codecs import dialect, framing
from .config import Config
from .ledger import Ledger
from .ledger.database import EmbeddedServer, create_pool, migrate
from .routing import Router
from .switch import FrameHandler, Listener, Switch

log = structlog.get_logger("pointswitch")


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def resolve_dsn(config: Config) -> tuple[str, EmbeddedServer | None]:
    """The configured DSN, or an embedded server's (started here, before any loop)."""
    if config.database.dsn:
        return config.database.dsn, None
    embedded = EmbeddedServer(config.data_dir)
    dsn = embedded.start()
    log.info("embedded PostgreSQL ready", data_dir=str(config.data_dir))
    return dsn, embedded


@contextlib.asynccontextmanager
async def database(config: Config, dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(
        dsn,
        min_size=config.database.pool_min_size,
        max_size=config.database.pool_max_size,
        command_timeout_s=config.database.command_timeout_s,
    )
    try:
        async with pool.acquire() as con:
            applied = await migrate(con)
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

    def address(self, listener: str) -> tuple[str, int]:
        host, port = self.switch.bound[listener]
        return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), port


@contextlib.asynccontextmanager
async def running_switch(config: Config, dsn: str) -> AsyncIterator[Running]:
    async with database(config, dsn) as pool:
        ledger = Ledger(pool)
        router = Router(ledger)
        listeners = [
            Listener(
                name=lc.name, host=lc.host, port=lc.port, framing=framing(lc.framing),
                handler=FrameHandler(lc.name, dialect(lc.dialect), router, config.limits.request_timeout_s),
            )
            for lc in config.listeners
        ]
        switch = Switch(listeners, config.limits)
        await switch.start()
        try:
            yield Running(switch, ledger, pool)
        finally:
            await switch.stop()


async def serve(config: Config, dsn: str) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_switch(config, dsn):
        log.info("switch running", listeners=len(config.listeners))
        await stop.wait()
        log.info("stopping: no new connections, finishing requests in flight")
    log.info("stopped")
