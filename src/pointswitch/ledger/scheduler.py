"""Closing each business day by itself, a grace period after its cut-off.

Every switch process runs one; the closer lock in ``days.close_day`` lets one
of them work at a time and the others find the day closed. A day missed while
no switch ran (or while the database was away) is closed at the next look, in
date order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import structlog

from ..tasks import cancel_and_wait
from . import days
from .days import DayError, Expirer

log = structlog.get_logger("pointswitch.ledger.scheduler")


class DayCloser:
    def __init__(self, pool: asyncpg.Pool, expirer: Expirer, *, grace_s: float, interval_s: float,
                 clearing_dir: Path, lock_timeout_ms: int = 250, attempts: int = 400):
        self._pool = pool
        self._expirer = expirer
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.clearing_dir = clearing_dir
        self._lock_timeout_ms = lock_timeout_ms
        self._attempts = attempts
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="day-closer")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    async def run_once(self) -> list[str]:
        """Close every day that is due; returns the dates closed."""
        closed = []
        for day in await days.days_due(self._pool, self.grace_s):
            result = await days.close_day(self._pool, self._expirer, day, by="scheduler",
                                          clearing_dir=self.clearing_dir, lock_timeout_ms=self._lock_timeout_ms,
                                          max_attempts=self._attempts)
            if result.changed:
                closed.append(day.isoformat())
        return closed

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except DayError as exc:  # another process is closing; or an order problem an operator must see
                log.info("day close not done", reason=str(exc))
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("day close failed; trying again later", error=str(exc))
            await asyncio.sleep(self.interval_s)
