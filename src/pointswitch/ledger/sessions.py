"""Terminals' sessions in memory, so that a forged MAC is refused without a database trip.

Each process keeps the :class:`TerminalAuth` of the terminals it has seen (an LRU
of ``max_entries``; unknown terminal ids are remembered for ``negative_ttl_s``, so
random ids cannot make every frame a query). Coherence across processes: any
change to a terminal, its pending keys or its merchant's status fires
``NOTIFY pointswitch_terminals`` (triggers of migration 0004), which every
process LISTENs to on a connection of its own. While that connection is down
the cache is bypassed (every lookup reads the database) and emptied, so a
missed notification can never leave stale keys or a stale status in use.

A load that overlaps any notification is returned but not kept (an epoch
counter), so a lookup racing a sign-off cannot store what was true before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from ..tasks import cancel_and_wait
from .model import TerminalAuth

log = structlog.get_logger("pointswitch.ledger")

CHANNEL = "pointswitch_terminals"

Loader = Callable[[str], Awaitable[TerminalAuth | None]]
Connect = Callable[[], Awaitable[asyncpg.Connection]]


class SessionCache:
    def __init__(self, loader: Loader, *, max_entries: int = 10_000, negative_ttl_s: float = 5.0,
                 reconnect_s: float = 1.0, refresh_interval_s: float = 1.0):
        self._loader = loader
        self.max_entries = max_entries
        self.negative_ttl_s = negative_ttl_s
        self.reconnect_s = reconnect_s
        self.refresh_interval_s = refresh_interval_s
        self._loaded_at: OrderedDict[str, float] = OrderedDict()
        self._entries: OrderedDict[str, tuple[TerminalAuth | None, float | None]] = OrderedDict()
        self._epoch = 0
        self._con: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self.hits = self.misses = 0

    @property
    def listening(self) -> bool:
        return self._con is not None and not self._con.is_closed()

    # -- life cycle --------------------------------------------------------------
    async def start(self, connect: Connect) -> None:
        """Listen for changes (first connection awaited, so the cache is coherent from the start)."""
        await self._listen(connect)
        self._task = asyncio.create_task(self._keep_listening(connect), name="session-cache-listener")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        con, self._con = self._con, None  # closing is not a loss
        if con is not None:
            with contextlib.suppress(Exception):
                await con.close()

    async def _listen(self, connect: Connect) -> None:
        try:
            con = await connect()
            await con.add_listener(CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("session cache cannot listen for changes; reading the database each time",
                        error=type(exc).__name__)
            return
        con.add_termination_listener(lambda c: self._connection_lost() if c is self._con else None)
        self._con = con
        self._lost.clear()
        self._forget_all()

    async def _keep_listening(self, connect: Connect) -> None:
        while True:
            if self.listening:
                await self._lost.wait()
            self._con = None
            self._forget_all()
            await asyncio.sleep(self.reconnect_s)
            await self._listen(connect)

    def _connection_lost(self) -> None:
        log.warning("session cache lost its change notifications; reading the database until they are back")
        self._forget_all()
        self._lost.set()

    # -- lookups -------------------------------------------------------------------
    async def get(self, terminal_id: str) -> TerminalAuth | None:
        if self.listening:
            entry = self._entries.get(terminal_id)
            if entry is not None:
                auth, expires = entry
                if expires is None or time.monotonic() < expires:
                    self._entries.move_to_end(terminal_id)
                    self.hits += 1
                    return auth
        self.misses += 1
        epoch = self._epoch
        auth = await self._loader(terminal_id)
        if self.listening and epoch == self._epoch:
            self._entries[terminal_id] = (auth, None if auth is not None else time.monotonic() + self.negative_ttl_s)
            self._entries.move_to_end(terminal_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return auth

    async def refresh(self, terminal_id: str) -> TerminalAuth | None:
        """Read a terminal again after a MAC did not verify, in case another process
        changed its keys and the notification is still on its way; at most once per
        ``refresh_interval_s`` per terminal, so forged MACs cannot make every frame a
        query. None when it was read too recently."""
        now = time.monotonic()
        last = self._loaded_at.get(terminal_id)
        if last is not None and now - last < self.refresh_interval_s:
            return None
        self._loaded_at[terminal_id] = now
        self._loaded_at.move_to_end(terminal_id)
        while len(self._loaded_at) > self.max_entries:
            self._loaded_at.popitem(last=False)
        self.forget(terminal_id)
        return await self.get(terminal_id)

    def forget(self, terminal_id: str) -> None:
        """This process changed the terminal: drop it now, before the notification arrives."""
        self._epoch += 1
        self._entries.pop(terminal_id, None)

    def _forget_all(self) -> None:
        self._epoch += 1
        self._entries.clear()

    def _notified(self, _con: object, _pid: int, _channel: str, payload: str) -> None:
        if payload == "*":
            self._forget_all()
        else:
            self.forget(payload)
