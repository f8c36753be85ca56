"""The ledger's core: its state, the one entry point, and what every operation shares.

Every operation enters through :meth:`Ledger.execute` (``service.Ledger``).

Each command runs in one PostgreSQL transaction. The order of work inside a
transaction is the same everywhere, which keeps lock order fixed (request row,
then card row) and so keeps deadlocks away:

1. read the context (terminal, merchant, card), draw a retrieval reference and
   take the business date (``business_date_now()``: a shared lock that a day's
   cut-off waits for; the terminal row is key-share locked, which a batch
   settlement waits for);
2. decide; move the card's balance with a conditional UPDATE (the row lock
   serialises concurrent requests on one card);
3. insert the request-log row under its idempotency key; if the key is taken
   the whole transaction is rolled back and the stored outcome is replayed;
4. append postings (debit, credit, amount) for approved outcomes.

Merchant and operator accounts are never updated in place: their balances are
sums over ``postings`` (view ``account_balances``).

Commands carry the card number as the terminal sent it; the ledger turns it into
the card index (``Vault.card_index``) where a command enters, and only the index
reaches SQL. The context row carries it on (``ctx["card_index"]``).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any

import asyncpg
import structlog

from . import gate
from .decide import cash_value_fen, terminal_refusal
from .group import GroupCommitter
from .model import (
    Command,
    DropSession,
    ExpiryRule,
    GroupCommit,
    Operation,
    OriginalRef,
    Outcome,
    Posting,
    PromoteKeys,
    RequestKey,
    SignOn,
    Status,
    TerminalAuth,
    UsageRule,
)
from .pins import PinCheck
from .sessions import Connect, SessionCache
from .terminals import TerminalKeys
from .vault import Vault

log = structlog.get_logger("pointswitch.ledger")

_CONTEXT = """
SELECT t.status AS terminal_status, t.merchant_id, t.current_batch,
       t.session_state, t.key_scheme, t.key_generation, t.pik_sealed, t.mak_sealed, t.tdk_sealed,
       m.status AS merchant_status, m.earn_rate_points_per_yuan AS earn_rate,
       m.redeem_value_fen_per_point AS redeem_value,
       m.issued_account_id, m.redeemed_account_id,
       c.status AS card_status, c.account_id AS card_account_id, c.points_balance,
       c.pin_hash, c.pin_locked, $2::text AS card_index,
       lpad(nextval('rrn_seq')::text, 12, '0') AS rrn,
       business_date_now() AS business_date
FROM terminals t
JOIN merchants m USING (merchant_id)
LEFT JOIN cards c ON c.card_index = $2
WHERE t.terminal_id = $1
FOR KEY SHARE OF t
"""

# Every transaction that posts asks for the business date first (before any row
# lock), so that a day's cut-off, which waits for them, never joins a lock cycle.
_BUSINESS_DATE = "SELECT business_date_now()"

_MOVE_CARD = """
UPDATE cards SET points_balance = points_balance + $2, updated_at = now()
WHERE card_index = $1 AND points_balance + $2 >= 0
RETURNING points_balance, account_id
"""

_INSERT_REQUEST = """
INSERT INTO requests (request_key, fingerprint, operation, state, status, terminal_id,
                      merchant_id, card_index, amount_fen, points, batch, trace, rrn,
                      original_request_id, shortfall_points, outcome)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
ON CONFLICT (request_key) DO NOTHING
RETURNING request_id
"""

# A request sent upstream (``holds``): the same row, with its leg and sealed reversal.
_INSERT_UPSTREAM_REQUEST = """
INSERT INTO requests (request_key, fingerprint, operation, state, status, terminal_id,
                      merchant_id, card_index, amount_fen, points, batch, trace, rrn,
                      original_request_id, shortfall_points, outcome,
                      upstream_connector, upstream_reference, reversal_sealed, deadline_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
        $17, $18, $19, now() + make_interval(secs => $20))
ON CONFLICT (request_key) DO NOTHING
RETURNING request_id
"""

_INSERT_POSTING = """
INSERT INTO postings (request_id, reason, debit_account_id, credit_account_id, amount_points)
VALUES ($1, $2, $3, $4, $5)
"""

_ORIGINAL = """
SELECT r.*, m.issued_account_id, m.redeemed_account_id
FROM requests r JOIN merchants m USING (merchant_id)
WHERE r.request_key = $1
FOR UPDATE OF r
"""

# Declines that happen before a request can be attributed to a terminal and a
# merchant are answered but not logged: the key does not belong to anyone. Nor is
# a batch mismatch (77): its key names a batch that is not open, settled already
# or not opened yet; logging it would take a key of a future batch (a later real
# request under it would be answered with this decline) or add a row to a batch
# whose totals are final.
_UNLOGGED = {Status.UNKNOWN_TERMINAL, Status.TERMINAL_DISABLED, Status.WRONG_MERCHANT, Status.BATCH_MISMATCH}


class _KeyTaken(Exception):
    """Raised inside a transaction to roll it back when the request key is taken."""


def points_for_value(amount_fen: int, value_fen_per_point: Decimal) -> int:
    """Points needed to pay ``amount_fen``, rounded up (in the network's favour)."""
    return int((Decimal(amount_fen) / value_fen_per_point).to_integral_value(ROUND_CEILING))


def points_for_cash(amount_fen: int, points_per_yuan: Decimal) -> int:
    """Points that buy ``amount_fen`` of cash or premium: ceil(fen x rate / 100)."""
    return int((Decimal(amount_fen) * points_per_yuan / 100).to_integral_value(ROUND_CEILING))


def clawback_due(points: int, amount_fen: int, refunded_fen_after: int, clawed_points: int) -> int:
    """Points still to claw back after refunding ``refunded_fen_after`` of an accrual.

    Cumulative and pro rata, rounded up in the network's favour, never more
    than the accrual earned in total."""
    if amount_fen <= 0:
        return 0
    due_total = -((-points * refunded_fen_after) // amount_fen)  # ceil
    return max(0, min(points, due_total) - clawed_points)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _day(ctx: asyncpg.Record) -> str:
    """The business date of a request's context (ISO), for the outcome."""
    return ctx["business_date"].isoformat() if ctx["business_date"] is not None else ""


def _auth_code() -> str:
    return f"{secrets.randbelow(1_000_000):06d}"



class LedgerCore:
    """What every step of the ledger shares: the pool, the vault, the request's
    context, the card's balance, the request log and the journal."""

    def __init__(self, pool: asyncpg.Pool, vault: Vault, *, max_pin_tries: int = 3,
                 usage: dict[Operation, UsageRule] | None = None, pin_workers: int = 2,
                 max_pending_sign_ons: int = 4, pending_keys_ttl_s: float = 300.0, session_cache_size: int = 10_000,
                 acquire_timeout_s: float = 10.0, expiry: ExpiryRule | None = None,
                 group_commit: GroupCommit | None = None):
        self._pool = pool
        # Accruals written together (``ledger.group``), once started; None: one transaction each.
        self._group_settings = group_commit
        self._group: GroupCommitter | None = None
        self.expiry = expiry or ExpiryRule()  # when new lots expire (ledger.lots)
        self._vault = vault
        self.acquire_timeout_s = acquire_timeout_s  # waiting for a pooled connection
        self.max_pin_tries = max_pin_tries
        self.usage = usage or {}
        self._pins = PinCheck(pool, vault.data_key("pvk"), max_pin_tries, pin_workers)
        self._terminals = TerminalKeys(pool, vault, max_pending=max_pending_sign_ons,
                                       pending_ttl_s=pending_keys_ttl_s, acquire_timeout_s=acquire_timeout_s)
        self.sessions = SessionCache(self._terminals.load, max_entries=session_cache_size)
        self._operator_ids: dict[str, int] = {}
        self._handlers = self._command_handlers()

    def _command_handlers(self) -> dict[type, Callable[[Any], Awaitable[Outcome]]]:
        """Which step runs each command (``service.Ledger``)."""
        raise NotImplementedError

    async def start(self, connect: Connect) -> None:
        """Start listening for terminal changes (``connect`` opens a connection of its own)."""
        await self.sessions.start(connect)
        if self._group_settings is not None and self._group_settings.writers > 0:
            g = self._group_settings
            self._group = GroupCommitter(self, writers=g.writers, max_batch=g.max_batch, queue_size=g.queue_size)
            self._group.start()

    async def stop(self) -> None:
        if self._group is not None:
            await self._group.stop()
            self._group = None
        await self.sessions.stop()
        self._pins.close()

    def close(self) -> None:
        self._pins.close()

    async def terminal_auth(self, terminal_id: str, *, refresh: bool = False) -> TerminalAuth | None:
        """A terminal's status, profile and working keys, from memory when it can. With
        ``refresh``: read again unless read within the last second (None then)."""
        if refresh:
            return await self.sessions.refresh(terminal_id)
        return await self.sessions.get(terminal_id)

    async def _sign_on(self, cmd: SignOn) -> Outcome:
        try:
            return await self._terminals.sign_on(cmd)
        finally:
            self.sessions.forget(cmd.terminal_id)

    async def _promote(self, cmd: PromoteKeys) -> Outcome:
        try:
            return await self._terminals.promote(cmd)
        finally:
            self.sessions.forget(cmd.terminal_id)

    async def _drop_session(self, cmd: DropSession) -> Outcome:
        try:
            return await self._terminals.drop(cmd)
        finally:
            self.sessions.forget(cmd.terminal_id)

    def _transaction(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        """A transaction of the current request, under its write gate (ledger.gate)."""
        return gate.transaction(self._pool, acquire_timeout_s=self.acquire_timeout_s)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @property
    def vault(self) -> Vault:
        """The vault card numbers are indexed and sealed with (the console finds cards through it)."""
        return self._vault

    async def execute(self, command: Command) -> Outcome:
        """The one entry point: run ``command`` in its own transaction."""
        handler = self._handlers[type(command)]
        outcome = await handler(command)
        assert outcome.points_balance is None or outcome.points_balance >= 0
        return outcome

    async def _context(self, con: asyncpg.Connection, cmd: Command, card: str | None
                       ) -> asyncpg.Record | Outcome:
        """Terminal, merchant and card (by its card index) of a request, and a fresh
        retrieval reference; or the refusal when the terminal is unknown, disabled or
        not of that merchant."""
        ctx = await con.fetchrow(_CONTEXT, cmd.terminal_id, card)
        # The terminal row is key-share locked by the context's read, so a settlement
        # closing this batch waits for this transaction, and one that committed first is seen.
        bad = terminal_refusal(ctx, cmd)
        if bad:
            return Outcome(bad, host_time=_now())
        return ctx

    async def stored(self, cmd: Posting) -> Outcome | None:
        """The answer already given under this request's key, if there is one (one read)."""
        return await self._lookup(cmd.key, self._fingerprint(cmd))

    async def _replay(self, key: RequestKey, fingerprint: bytes | None) -> Outcome:
        outcome = await self._lookup(key, fingerprint)
        assert outcome is not None, "a taken key has a row"
        return outcome

    async def _lookup(self, key: RequestKey, fingerprint: bytes | None) -> Outcome | None:
        async with self._pool.acquire() as con:
            row = await con.fetchrow(
                "SELECT fingerprint, state, outcome FROM requests WHERE request_key = $1", str(key)
            )
        if row is None:
            return None
        if row["state"] == "placeholder":
            return Outcome(Status.ALREADY_REVERSED, host_time=_now())
        if fingerprint is not None and bytes(row["fingerprint"]) != fingerprint:
            return Outcome(Status.DUPLICATE_KEY, host_time=_now())
        return Outcome.from_json(row["outcome"])

    @staticmethod
    async def _move_card(con: asyncpg.Connection, card: str, delta: int, *, cap: bool = False
                         ) -> tuple[int, int, int] | None:
        """Add ``delta`` points to a card (by card index). Returns (applied, new balance, account id),
        or None when the balance would go below zero. With ``cap`` a debit takes
        what is there instead of failing (reversals and refunds must go through)."""
        if cap and delta < 0:
            row = await con.fetchrow(
                "SELECT points_balance FROM cards WHERE card_index = $1 FOR UPDATE", card
            )
            if row is None:
                return None
            delta = -min(-delta, row["points_balance"])
        row = await con.fetchrow(_MOVE_CARD, card, delta)
        if row is None:
            return None
        return delta, row["points_balance"], row["account_id"]

    @staticmethod
    async def _post(con: asyncpg.Connection, request_id: int, reason: str,
                    debit: int, credit: int, points: int) -> None:
        assert points >= 0 and debit != credit
        if points:
            await con.execute(_INSERT_POSTING, request_id, reason, debit, credit, points)

    def _fingerprint(self, cmd: Posting) -> bytes:
        return self._vault.fingerprint(cmd.content_digest())

    async def _log(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting, outcome: Outcome, *,
                   original_id: int | None = None, shortfall: int = 0, upstream: bool = False) -> int:
        """The request's row under its key (raises _KeyTaken when the key is taken). With
        ``upstream``: also the command's leg, its reversal sealed, and the deadline."""
        state = "approved" if outcome.approved else "pending" if outcome.status is Status.PENDING else "declined"
        args = [str(cmd.key), self._fingerprint(cmd), cmd.operation.value, state,
                outcome.status.value, cmd.terminal_id, cmd.merchant_id, ctx["card_index"],
                cmd.amount_fen, outcome.points_moved, cmd.key.batch, cmd.key.trace, outcome.rrn,
                original_id, shortfall, outcome.to_json()]
        if upstream:
            leg = cmd.upstream
            assert leg is not None
            args += [leg.connector, leg.reference, self._vault.seal(leg.reversal, f"reversal:{cmd.key}"),
                     leg.deadline_s]
        request_id = await con.fetchval(_INSERT_UPSTREAM_REQUEST if upstream else _INSERT_REQUEST, *args)
        if request_id is None:
            raise _KeyTaken
        return int(request_id)

    async def _decline(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting,
                       status: Status, balance: int | None = None) -> Outcome:
        outcome = Outcome(status, rrn=ctx["rrn"], host_time=_now(), points_balance=balance,
                          business_date=_day(ctx))
        await self._log(con, ctx, cmd, outcome)
        return outcome

    def _approved(self, ctx: asyncpg.Record, points: int, balance: int) -> Outcome:
        return Outcome(
            Status.APPROVED, points_moved=points, points_balance=balance,
            cash_value_fen=cash_value_fen(balance, ctx["redeem_value"]),
            rrn=ctx["rrn"], auth_code=_auth_code(), host_time=_now(), business_date=_day(ctx),
        )

    async def _original(self, con: asyncpg.Connection, cmd: Posting, ref: OriginalRef
                        ) -> asyncpg.Record | None:
        key = RequestKey(cmd.terminal_id, ref.batch, ref.trace)
        return await con.fetchrow(_ORIGINAL, str(key))

    async def operator_account(self, con: asyncpg.Connection, name: str) -> int:
        if name not in self._operator_ids:
            rows = await con.fetch("SELECT owner, account_id FROM accounts WHERE kind = 'operator'")
            self._operator_ids.update({r["owner"]: r["account_id"] for r in rows})
        return self._operator_ids[name]
