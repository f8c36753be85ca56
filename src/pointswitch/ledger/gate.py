"""What a request's deadline may still do to it: the ledger's side of "an answer never lies".

The switch gives each request a :class:`WriteGate` (through a context variable, so
it follows the request into every ledger call) and asks it, when the request's
deadline passes or its connection closes, whether the request can still be
abandoned:

- nothing began: it is abandoned; any transaction it tries to begin later is
  refused (:class:`Abandoned`), so nothing will ever be written: answer 96;
- a transaction is open and its COMMIT was not sent: the database connection is
  terminated, so PostgreSQL rolls the transaction back and it can never commit:
  answer 96;
- a COMMIT was sent (its outcome not known yet) or a transaction of this request
  committed: it cannot be abandoned. The switch waits for the outcome and answers
  what happened, or, if the database never says, does not answer at all (the
  terminal reverses an unanswered request; the reversal settles it exactly once).

Work outside any request (the forwarder, operator commands) runs under an open
gate that never refuses.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Iterator
from enum import Enum

import asyncpg


class Abandoned(Exception):
    """The request was given up (its deadline passed or its connection closed) before
    it began to write: it must not begin now."""


class Phase(Enum):
    IDLE = "idle"  # no transaction open
    OPEN = "open"  # a transaction is open, its COMMIT not sent
    COMMITTING = "committing"  # COMMIT sent, outcome not known


class WriteGate:
    def __init__(self) -> None:
        self.phase = Phase.IDLE
        self.abandoned = False
        self.began = 0  # transactions of this request that began (it reached the database)
        # Its request key was looked up and found free: a 96 cannot hide an earlier
        # attempt of the same request that committed (a retransmission's original).
        self.key_checked = False
        self.committed = 0  # transactions of this request that committed
        self.unknown = False  # a COMMIT was sent and its outcome never came back
        self._connection: asyncpg.Connection | None = None

    @property
    def settled(self) -> bool:
        """Something of this request is, or may be, durable."""
        return self.committed > 0 or self.phase is Phase.COMMITTING or self.unknown

    def abandon(self) -> bool:
        """Give the request up. True when it can never write anything (answer 96, or
        nothing for a closed connection); False when a COMMIT is under way or done."""
        if self.settled:
            return False
        self.abandoned = True
        if self.phase is Phase.OPEN and self._connection is not None:
            self._connection.terminate()  # no COMMIT was sent: the server rolls back
        return True

    def sever(self) -> None:
        """The outcome of a COMMIT never came: drop the connection (what it was doing
        is decided by the server alone; this request is not answered)."""
        self.unknown = True
        if self._connection is not None:
            self._connection.terminate()

    # -- the ledger's side ----------------------------------------------------------
    def _begin(self, con: asyncpg.Connection) -> None:
        if self.abandoned:
            raise Abandoned
        self.phase, self._connection = Phase.OPEN, con
        self.began += 1

    def _committing(self) -> None:
        if self.abandoned:
            raise Abandoned
        self.phase = Phase.COMMITTING

    def _ended(self, *, committed: bool, unknown: bool = False) -> None:
        self.phase, self._connection = Phase.IDLE, None
        self.committed += committed
        self.unknown = self.unknown or unknown


class _OpenGate(WriteGate):
    """Never refuses: work that is not a terminal's request."""

    def abandon(self) -> bool:
        return False


_CURRENT: contextvars.ContextVar[WriteGate | None] = contextvars.ContextVar("pointswitch_write_gate", default=None)


def current() -> WriteGate:
    return _CURRENT.get() or _OpenGate()


@contextlib.contextmanager
def gated(gate: WriteGate) -> Iterator[None]:
    """Run what is started inside (tasks included: they copy the context) under ``gate``."""
    token = _CURRENT.set(gate)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.asynccontextmanager
async def transaction(pool: asyncpg.Pool, *, acquire_timeout_s: float, **options: object
                      ) -> AsyncIterator[asyncpg.Connection]:
    """A transaction of the current request, under its gate: refused once the request
    was abandoned; its COMMIT marked as sent before it is sent."""
    gate = current()
    if gate.abandoned:
        raise Abandoned
    async with pool.acquire(timeout=acquire_timeout_s) as con:
        gate._begin(con)
        tx = con.transaction(**options)  # type: ignore[arg-type]
        await tx.start()
        try:
            yield con
            gate._committing()  # refuses when the request was given up meanwhile: rolled back below
        except BaseException:
            gate._ended(committed=False)
            if not con.is_closed():
                with contextlib.suppress(Exception):
                    await tx.rollback()
            raise
        try:
            await tx.commit()
        except BaseException as exc:
            # An error the server answered means rolled back; anything else (the
            # connection dropped, a timeout, a cancellation) leaves the outcome unknown.
            answered = isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, asyncpg.PostgresConnectionError)
            gate._ended(committed=False, unknown=not answered)
            raise
        gate._ended(committed=True)
