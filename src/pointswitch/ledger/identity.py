"""Numbers for the identity of messages sent upstream, unique across processes and restarts.

One ``nextval`` on ``upstream_identity_seq`` (migration 0007) reserves a block
of numbers (the sequence's INCREMENT BY); this process hands them out one by
one and draws the next block when it runs out. PostgreSQL never returns the
same sequence value twice, whatever the number of processes, and a block left
half used by a process that stopped is skipped, never handed out again. The
switch turns each number into a trace (11) and a retrieval reference (37):
``routing.legs.leg_identity``.
"""

from __future__ import annotations

import asyncio

import asyncpg

_SEQUENCE = "upstream_identity_seq"


class IdentityBlocks:
    """Hands out numbers from blocks reserved in PostgreSQL (``await blocks.next()``)."""

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool
        self._next = 0
        self._end = 0  # exclusive; next == end: the block is used up
        self._lock = asyncio.Lock()
        self.blocks_drawn = 0

    async def next(self) -> int:
        if self._next >= self._end:
            async with self._lock:
                if self._next >= self._end:
                    await self._draw_block()
        value = self._next
        self._next += 1
        return value

    async def _draw_block(self) -> None:
        async with self._pool.acquire() as con:
            row = await con.fetchrow(
                "SELECT nextval($1::regclass) AS start, s.seqincrement AS increment_by FROM pg_sequence s"
                " WHERE s.seqrelid = $1::regclass", _SEQUENCE,
            )
        if row is None:
            raise RuntimeError(f"sequence {_SEQUENCE} is missing: migration 0007 not applied")
        start, size = int(row["start"]), int(row["increment_by"])
        assert start >= 0 and size >= 1, "the sequence counts up from 0"
        self._next, self._end = start, start + size
        self.blocks_drawn += 1
