"""The database as the switch sees it: one warning when it goes away, one when it is back.

During an outage every request that needs the database fails; logging a traceback
for each would flood the log (megabytes a minute) and hide the one line that
matters. Instead: a counter per failure, one warning at the first, one at the
recovery with how long it lasted and how many requests it cost.
"""

from __future__ import annotations

import time

import asyncpg
import structlog

from . import metrics

log = structlog.get_logger("pointswitch.switch")

# What a database that is down, stopped, hung or restarting raises.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,  # starting up, shutting down, recovering
    asyncpg.InternalClientError,  # a pooled connection whose server died mid-operation
    asyncpg.InterfaceError,  # includes "connection does not exist" / "connection was closed"
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,  # statement timeout
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    OSError,
    TimeoutError,  # command_timeout, or no pooled connection in time
)


class DatabaseHealth:
    def __init__(self) -> None:
        self.down_since: float | None = None
        self.failed_requests = 0

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, exc: BaseException) -> None:
        metrics.DATABASE_FAILURES.inc()
        self.failed_requests += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            metrics.DATABASE_UP.set(0)
            log.warning("database unavailable: requests that need it are answered 96 until it is back",
                        error=type(exc).__name__, detail=str(exc)[:200])

    def ok(self) -> None:
        if self.down_since is not None:
            log.warning("database available again", outage_s=round(time.monotonic() - self.down_since, 1),
                        failed_requests=self.failed_requests)
            self.down_since = None
            self.failed_requests = 0
            metrics.DATABASE_UP.set(1)
