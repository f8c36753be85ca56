"""Group commit: the accruals of all connections written together, one transaction
and one COMMIT for many requests.

A few writers (``writers``), each with a connection of its own, take whatever
accruals are waiting (up to ``max_batch``) and write them as one batch. Nobody
waits for company: a writer that is free takes a lone request at once, so under
light load a batch is one request, and under heavy load the requests that
arrive while the writers are busy form the next batches. One batch is six round
trips whatever its size:

1. BEGIN;
2. the business date (the shared day lock, first, as every posting transaction)
   and which of the batch's keys are taken already (those are answered from the
   log after COMMIT; knowing the others free is what lets a later 96 be true);
3. the batch's terminal rows key-share locked and its card rows locked
   ``FOR UPDATE`` in card order (so concurrent batches never deadlock);
4. the context of every request, read after the locks (balances are exact);
5. one statement: the request rows ``ON CONFLICT DO NOTHING`` and, for those
   whose key was free, the cards' balances, the lots and the postings (a key
   taken meanwhile drops that request alone; its neighbours on the same card
   are decided again and their stored outcomes corrected);
6. COMMIT (``synchronous_commit`` as configured: on by default).

Each request decides in arrival order (``decide.decide_accrual``) against the
balance its card has so far in the batch. No answer leaves before its COMMIT
returned. "An answer never lies" holds as for a transaction of its own: a
request given up before its batch began is left out; one whose deadline passes
while its batch is open (COMMIT not sent) cuts the batch's connection, so
nothing of the batch can commit, and every request of it is answered 96,
truthfully (under a stall that long its neighbours are past their deadlines
too); once the COMMIT is sent, the deadline waits for its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from ..tasks import cancel_and_wait
from . import gate
from .decide import Decision, decide_accrual
from .model import Outcome, Posting

if TYPE_CHECKING:
    from .core import LedgerCore

log = structlog.get_logger("pointswitch.ledger.group")

# The business date first (the shared day lock, before any row lock, as every
# posting transaction), and which of the batch's keys are taken already.
_KEYS = """
SELECT business_date_now() AS business_date,
       array(SELECT request_key FROM requests WHERE request_key = ANY($1::text[])) AS taken
"""

_LOCK = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM terminals WHERE terminal_id = ANY($1::text[]) FOR KEY SHARE) t) AS t,
       (SELECT count(*) FROM (SELECT 1 FROM cards WHERE card_index = ANY($2::text[])
                              ORDER BY card_index FOR UPDATE) c) AS c
"""

_CONTEXT = """
SELECT u.n, t.status AS terminal_status, t.merchant_id, t.current_batch,
       m.status AS merchant_status, m.earn_rate_points_per_yuan AS earn_rate,
       m.redeem_value_fen_per_point AS redeem_value, m.issued_account_id,
       c.status AS card_status, c.account_id AS card_account_id, c.points_balance, u.card AS card_index,
       lpad(nextval('rrn_seq')::text, 12, '0') AS rrn, $3::date AS business_date,
       nx.expires_on AS next_date, nx.points AS next_points
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(terminal_id, card, n)
-- LATERAL lookups: one index probe per request, whatever the planner thinks of unnest's size
LEFT JOIN LATERAL (SELECT * FROM terminals WHERE terminal_id = u.terminal_id) t ON true
LEFT JOIN LATERAL (SELECT * FROM merchants WHERE merchant_id = t.merchant_id) m ON true
LEFT JOIN LATERAL (SELECT * FROM cards WHERE card_index = u.card) c ON true
LEFT JOIN LATERAL (
    SELECT l.expires_on, sum(l.points_left) AS points FROM point_lots l
    WHERE l.card_index = u.card AND l.points_left > 0 AND l.expires_on IS NOT NULL
    GROUP BY l.expires_on ORDER BY l.expires_on LIMIT 1) nx ON true
ORDER BY u.n
"""

# The requests' rows, and for those whose key was free the cards, lots and postings
# of the approved ones: one statement. A key taken meanwhile writes nothing of its
# request (only the rows RETURNING names are written on).
_WRITE = """
WITH decided AS (
    SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::bigint[], $10::bigint[], $11::int[], $12::int[], $13::text[], $14::jsonb[],
                         $15::bigint[], $16::bigint[], $17::date[])
        AS d(request_key, fingerprint, operation, state, status, terminal_id, merchant_id, card_index, amount_fen,
             points, batch, trace, rrn, outcome, debit, credit, expires_on)
), logged AS (
    INSERT INTO requests (request_key, fingerprint, operation, state, status, terminal_id, merchant_id, card_index,
                          amount_fen, points, batch, trace, rrn, outcome)
    SELECT request_key, fingerprint, operation, state, status, terminal_id, merchant_id, card_index, amount_fen,
           points, batch, trace, rrn, outcome FROM decided
    ON CONFLICT (request_key) DO NOTHING
    RETURNING request_key, request_id
), earned AS (
    SELECT l.request_id, d.* FROM logged l JOIN decided d USING (request_key) WHERE d.points > 0
), cards_moved AS (
    UPDATE cards c SET points_balance = c.points_balance + e.points, updated_at = now()
    FROM (SELECT card_index, sum(points) AS points FROM earned GROUP BY card_index) e
    WHERE c.card_index = e.card_index AND c.card_index = ANY($19::text[])
), lots AS (
    INSERT INTO point_lots (card_index, request_id, origin, earned_on, expires_on, points_earned, points_left)
    SELECT card_index, request_id, 'accrual', $18::date, expires_on, points, points FROM earned
), posted AS (
    INSERT INTO postings (request_id, reason, debit_account_id, credit_account_id, amount_points)
    SELECT request_id, 'accrue', debit, credit, points FROM earned
)
SELECT request_key, request_id FROM logged
"""

_REOUTCOME = "UPDATE requests SET outcome = $2::jsonb WHERE request_id = $1"


def _closed(con: asyncpg.Connection) -> bool:
    """Closed, or cut (a request's deadline terminates it, and the pool then takes it back)."""
    try:
        return con.is_closed()
    except asyncpg.InterfaceError:
        return True


@dataclass(eq=False)  # compared and hashed by identity: one per request
class _Item:
    cmd: Posting
    card_index: str
    fingerprint: bytes
    gate: gate.WriteGate
    future: asyncio.Future[Outcome]
    decision: Decision | None = None
    context: Any = None
    request_id: int | None = None


@dataclass
class GroupCommitter:
    """The accrual writers. ``submit`` returns the request's outcome once committed."""

    core: LedgerCore
    writers: int = 3
    max_batch: int = 64
    queue_size: int = 1024
    _queue: asyncio.Queue[_Item] = field(init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._writer(i), name=f"group-commit-{i}") for i in range(self.writers)]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        while not self._queue.empty():  # nothing of these began (their keys unchecked: not answered)
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(gate.Abandoned())

    async def submit(self, cmd: Posting, card_index: str, fingerprint: bytes) -> Outcome:
        write_gate = gate.current()
        if write_gate.abandoned:
            raise gate.Abandoned
        item = _Item(cmd, card_index, fingerprint, write_gate, asyncio.get_running_loop().create_future())
        await self._queue.put(item)
        return await item.future

    async def _writer(self, number: int) -> None:
        con: asyncpg.Connection | None = None
        try:
            while True:
                items = [await self._queue.get()]
                while len(items) < self.max_batch and not self._queue.empty():
                    items.append(self._queue.get_nowait())
                items = [it for it in items if self._joinable(it)]
                if not items:
                    continue
                if con is None or _closed(con):
                    con = await self._connect(items)
                    if con is None:
                        continue
                await self._run(con, items)
                if _closed(con):
                    await self._release(con)
                    con = None
        finally:
            if con is not None:
                await self._release(con)

    @staticmethod
    def _joinable(item: _Item) -> bool:
        """A request given up before its batch began is not written (its answer is 96 or none)."""
        if item.gate.abandoned or item.future.done():
            if not item.future.done():
                item.future.set_exception(gate.Abandoned())
            return False
        return True

    async def _connect(self, items: list[_Item]) -> asyncpg.Connection | None:
        try:
            return await self.core.pool.acquire(timeout=self.core.acquire_timeout_s)
        except Exception as exc:  # the database is away: nothing began, the requests fail (96 or none)
            for it in items:
                it.future.set_exception(exc)
            return None

    async def _release(self, con: asyncpg.Connection) -> None:
        with contextlib.suppress(Exception):
            await self.core.pool.release(con)

    async def _run(self, con: asyncpg.Connection, items: list[_Item]) -> None:
        for it in items:  # the batch's connection is each request's: a deadline before COMMIT cuts it
            it.gate._begin(con)
        tx = con.transaction()
        committed, unknown = False, False
        try:
            await tx.start()
            replays = await self._write(con, items)
            for it in items:
                it.gate._committing()
            try:
                await tx.commit()
            except BaseException as exc:
                answered = isinstance(exc, asyncpg.PostgresError) and not isinstance(
                    exc, asyncpg.PostgresConnectionError)
                unknown = not answered
                raise
            committed = True
        except BaseException as exc:
            if not committed and not unknown and not _closed(con):
                with contextlib.suppress(Exception):
                    await tx.rollback()
            for it in items:
                it.gate._ended(committed=False, unknown=unknown)
                if not it.future.done():
                    it.future.set_exception(exc if isinstance(exc, Exception) else gate.Abandoned())
            if not isinstance(exc, Exception):
                raise
            log.warning("group commit failed: nothing of the batch was written", size=len(items),
                        error=type(exc).__name__, unknown=unknown)
            return
        for it in items:
            it.gate._ended(committed=it not in replays)
        for it in items:
            if it in replays:
                try:
                    outcome = await self.core._replay(it.cmd.key, it.fingerprint)
                except Exception as exc:
                    if not it.future.done():
                        it.future.set_exception(exc)
                    continue
                if not it.future.done():
                    it.future.set_result(outcome)
            else:
                assert it.decision is not None
                if not it.future.done():
                    it.future.set_result(it.decision.outcome)

    async def _write(self, con: asyncpg.Connection, items: list[_Item]) -> set[_Item]:
        """Steps 2-5 of the module's docstring; returns the requests whose key was taken
        (by an earlier attempt, or twice in this batch), to be answered from the log."""
        keys = await con.fetchrow(_KEYS, [str(it.cmd.key) for it in items])
        day, known = keys["business_date"], set(keys["taken"])
        # Answered from the log after COMMIT: a key an earlier attempt holds, and the same
        # key twice in one batch (retransmissions on several connections) but the first.
        first: dict[str, _Item] = {}
        taken = {it for it in items if str(it.cmd.key) in known or first.setdefault(str(it.cmd.key), it) is not it}
        live = [it for it in items if it not in taken]
        for it in live:  # its key is free: a 96 could not hide an earlier attempt that committed
            it.gate.key_checked = True
        # (A taken key's request is answered from the log or not at all, never 96: its
        # earlier attempt committed. Its gate keeps key_checked False.)
        if not live:
            return taken
        terminals = [it.cmd.terminal_id for it in live]
        cards = [it.card_index for it in live]
        await con.fetchrow(_LOCK, sorted(set(terminals)), sorted(set(cards)))
        for it, ctx in zip(live, await con.fetch(_CONTEXT, terminals, cards, day), strict=True):
            it.context = ctx
        host_time = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._decide(items, taken, host_time)
        logged = [it for it in items if it not in taken and it.decision is not None and it.decision.logged]
        if logged:
            rows = await con.fetch(_WRITE, *self._rows(logged), day, sorted({it.card_index for it in logged}))
            ids = {r["request_key"]: r["request_id"] for r in rows}
            for it in logged:
                it.request_id = ids.get(str(it.cmd.key))
                if it.request_id is None:  # an earlier attempt of it holds the key
                    taken.add(it)
                    it.gate.key_checked = False
            if len(ids) < len(logged):  # taken meanwhile by a batch that committed since _KEYS
                await self._decided_again(con, items, taken, host_time)
        return taken

    async def _decided_again(self, con: asyncpg.Connection, items: list[_Item], taken: set[_Item],
                             host_time: str) -> None:
        """A request whose key was taken was left out: the balances its neighbours on the
        same card were told are decided again, and their stored outcomes corrected."""
        before = {it: it.decision.outcome for it in items if it.decision is not None}
        self._decide(items, taken, host_time)
        for it in items:
            if it not in taken and it.request_id is not None and it.decision is not None \
                    and it.decision.outcome != before.get(it):
                await con.execute(_REOUTCOME, it.request_id, it.decision.outcome.to_json())

    def _decide(self, items: list[_Item], taken: set[_Item], host_time: str) -> None:
        """Each request in arrival order, against what its card has so far in the batch:
        the balance, and the soonest expiry (what the member is told in field 44)."""
        balances: dict[str, int] = {}
        soonest: dict[str, tuple[datetime.date, int] | None] = {}
        for it in items:
            if it in taken:
                continue
            ctx = it.context
            card = it.card_index
            if ctx["card_status"] is not None and card not in balances:
                balances[card] = int(ctx["points_balance"])
            if card not in soonest:
                soonest[card] = (ctx["next_date"], int(ctx["next_points"])) if ctx["next_date"] is not None else None
            auth = it.decision.outcome.auth_code if it.decision is not None else f"{secrets.randbelow(10**6):06d}"
            it.decision = decide_accrual(
                ctx if ctx["terminal_status"] is not None else None, it.cmd, balance=balances.get(card),
                dated=soonest[card], expiry=self.core.expiry, host_time=host_time, auth_code=auth)
            if it.decision.points:
                balances[card] += it.decision.points
                told = it.decision.outcome.extra.get("next_expiry")
                if told is not None:
                    soonest[card] = (datetime.date.fromisoformat(told["date"]), int(told["points"]))

    @staticmethod
    def _rows(items: list[_Item]) -> list[list[Any]]:
        """The ``_WRITE`` statement's arrays, one element per request."""
        columns: list[list[Any]] = [[] for _ in range(17)]
        for it in items:
            assert it.decision is not None
            o, cmd, ctx = it.decision.outcome, it.cmd, it.context
            state = "approved" if o.approved else "declined"
            row = (str(cmd.key), it.fingerprint, cmd.operation.value, state, o.status.value, cmd.terminal_id,
                   cmd.merchant_id, it.card_index, cmd.amount_fen, o.points_moved, cmd.key.batch, cmd.key.trace,
                   o.rrn, o.to_json(), ctx["issued_account_id"], ctx["card_account_id"], it.decision.expires_on)
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        return columns
