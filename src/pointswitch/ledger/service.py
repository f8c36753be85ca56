"""The ledger: every operation enters through :meth:`Ledger.execute`.

Each command runs in one PostgreSQL transaction. The order of work inside a
transaction is the same everywhere, which keeps lock order fixed (request row,
then card row) and so keeps deadlocks away:

1. read the context (terminal, merchant, card) and draw a retrieval reference;
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
from dataclasses import replace
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import asyncpg
import structlog

from . import gate
from .model import (
    UPSTREAM_OPERATIONS,
    Command,
    CompleteUpstream,
    DropSession,
    Inquire,
    Operation,
    OriginalRef,
    Outcome,
    Posting,
    PromoteKeys,
    RequestKey,
    Reverse,
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
       lpad(nextval('rrn_seq')::text, 12, '0') AS rrn
FROM terminals t
JOIN merchants m USING (merchant_id)
LEFT JOIN cards c ON c.card_index = $2
WHERE t.terminal_id = $1
"""

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
# merchant are answered but not logged: the key does not belong to anyone.
_UNLOGGED = {Status.UNKNOWN_TERMINAL, Status.TERMINAL_DISABLED, Status.WRONG_MERCHANT}


class _KeyTaken(Exception):
    """Raised inside a transaction to roll it back when the request key is taken."""


def earned_points(amount_fen: int, earn_rate_points_per_yuan: Decimal) -> int:
    """floor(amount in fen x earn rate / 100)."""
    return int((Decimal(amount_fen) * earn_rate_points_per_yuan / 100).to_integral_value(ROUND_FLOOR))


def points_for_value(amount_fen: int, value_fen_per_point: Decimal) -> int:
    """Points needed to pay ``amount_fen``, rounded up (in the network's favour)."""
    return int((Decimal(amount_fen) / value_fen_per_point).to_integral_value(ROUND_CEILING))


def points_for_cash(amount_fen: int, points_per_yuan: Decimal) -> int:
    """Points that buy ``amount_fen`` of cash or premium: ceil(fen x rate / 100)."""
    return int((Decimal(amount_fen) * points_per_yuan / 100).to_integral_value(ROUND_CEILING))


def cash_value_fen(points: int, value_fen_per_point: Decimal) -> int:
    return int((Decimal(points) * value_fen_per_point).to_integral_value(ROUND_FLOOR))


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


def _auth_code() -> str:
    return f"{secrets.randbelow(1_000_000):06d}"


class Ledger:
    def __init__(self, pool: asyncpg.Pool, vault: Vault, *, max_pin_tries: int = 3,
                 usage: dict[Operation, UsageRule] | None = None, pin_workers: int = 2,
                 max_pending_sign_ons: int = 4, pending_keys_ttl_s: float = 300.0, session_cache_size: int = 10_000,
                 acquire_timeout_s: float = 10.0):
        self._pool = pool
        self._vault = vault
        self.acquire_timeout_s = acquire_timeout_s  # waiting for a pooled connection
        self.max_pin_tries = max_pin_tries
        self.usage = usage or {}
        self._pins = PinCheck(pool, vault.data_key("pvk"), max_pin_tries, pin_workers)
        self._terminals = TerminalKeys(pool, vault, max_pending=max_pending_sign_ons,
                                       pending_ttl_s=pending_keys_ttl_s)
        self.sessions = SessionCache(self._terminals.load, max_entries=session_cache_size)
        self._operator_ids: dict[str, int] = {}
        self._handlers: dict[type, Callable[[Any], Awaitable[Outcome]]] = {
            SignOn: self._sign_on,
            PromoteKeys: self._promote,
            DropSession: self._drop_session,
            Inquire: self._inquire,
            Posting: self._posting,
            Reverse: self._reverse,
            CompleteUpstream: self._complete_upstream,
        }

    async def start(self, connect: Connect) -> None:
        """Start listening for terminal changes (``connect`` opens a connection of its own)."""
        await self.sessions.start(connect)

    async def stop(self) -> None:
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

    async def execute(self, command: Command) -> Outcome:
        """The one entry point: run ``command`` in its own transaction."""
        handler = self._handlers[type(command)]
        outcome = await handler(command)
        assert outcome.points_balance is None or outcome.points_balance >= 0
        return outcome

    # -- helpers ------------------------------------------------------------
    async def _context(self, con: asyncpg.Connection, cmd: Command, card: str | None
                       ) -> asyncpg.Record | Outcome:
        """Terminal, merchant and card (by its card index) of a request, and a fresh
        retrieval reference; or the refusal when the terminal is unknown, disabled or
        not of that merchant."""
        ctx = await con.fetchrow(_CONTEXT, cmd.terminal_id, card)
        bad = self._check_terminal(ctx, cmd)
        if bad:
            return Outcome(bad, host_time=_now())
        return ctx

    @staticmethod
    def _check_terminal(ctx: asyncpg.Record | None, cmd: Command) -> Status | None:
        if ctx is None:
            return Status.UNKNOWN_TERMINAL
        if ctx["merchant_id"] != cmd.merchant_id or ctx["merchant_status"] != "active":
            return Status.WRONG_MERCHANT
        if ctx["terminal_status"] != "active":
            return Status.TERMINAL_DISABLED
        return None

    async def _stored(self, cmd: Posting) -> Outcome | None:
        """The answer already given under this request's key, if there is one."""
        async with self._pool.acquire() as con:
            taken = await con.fetchval("SELECT 1 FROM requests WHERE request_key = $1", str(cmd.key))
        return await self._replay(cmd.key, self._fingerprint(cmd)) if taken else None

    async def _replay(self, key: RequestKey, fingerprint: bytes | None) -> Outcome:
        async with self._pool.acquire() as con:
            row = await con.fetchrow(
                "SELECT fingerprint, state, outcome FROM requests WHERE request_key = $1", str(key)
            )
        assert row is not None, "a taken key has a row"
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
                   original_id: int | None = None, shortfall: int = 0) -> int:
        state = "approved" if outcome.approved else "pending" if outcome.status is Status.PENDING else "declined"
        request_id = await con.fetchval(
            _INSERT_REQUEST, str(cmd.key), self._fingerprint(cmd), cmd.operation.value, state,
            outcome.status.value, cmd.terminal_id, cmd.merchant_id, ctx["card_index"],
            cmd.amount_fen, outcome.points_moved, cmd.key.batch, cmd.key.trace, outcome.rrn,
            original_id, shortfall, outcome.to_json(),
        )
        if request_id is None:
            raise _KeyTaken
        return int(request_id)

    async def _inquire(self, cmd: Inquire) -> Outcome:
        card_index = self._vault.card_index(cmd.card_number)
        pin_refusal = await self._pins.check(cmd.card_number, card_index, cmd.pin) if cmd.pin_required else None
        async with self._transaction() as con:
            ctx = await self._context(con, cmd, card_index)
            if isinstance(ctx, Outcome):
                return ctx
            if ctx["card_status"] is None:
                return Outcome(Status.UNKNOWN_CARD, rrn=ctx["rrn"], host_time=_now())
            if ctx["card_status"] != "active":
                return Outcome(Status.BLOCKED_CARD, rrn=ctx["rrn"], host_time=_now())
            if pin_refusal:
                return Outcome(pin_refusal, rrn=ctx["rrn"], host_time=_now())
        balance = ctx["points_balance"]
        return Outcome(
            Status.APPROVED, points_balance=balance,
            cash_value_fen=cash_value_fen(balance, ctx["redeem_value"]),
            rrn=ctx["rrn"], auth_code=_auth_code(), host_time=_now(),
        )

    # -- postings ------------------------------------------------------------
    async def _posting(self, cmd: Posting) -> Outcome:
        card_index = self._vault.card_index(cmd.card_number)
        if cmd.pin_required:
            # A retransmission is answered from the log and costs no PIN try; the
            # check itself runs before the transaction, holding no connection.
            stored = await self._stored(cmd)
            if stored is not None:
                return stored
            cmd = replace(cmd, pin_refusal=await self._pins.check(cmd.card_number, card_index, cmd.pin))
        try:
            async with self._transaction() as con:
                ctx = await self._context(con, cmd, card_index)
                if isinstance(ctx, Outcome):
                    return ctx
                step = _STEPS[cmd.operation]
                return await step(self, con, ctx, cmd)
        except _KeyTaken:
            return await self._replay(cmd.key, self._fingerprint(cmd))

    async def _decline(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting,
                       status: Status, balance: int | None = None) -> Outcome:
        outcome = Outcome(status, rrn=ctx["rrn"], host_time=_now(), points_balance=balance)
        await self._log(con, ctx, cmd, outcome)
        return outcome

    def _approved(self, ctx: asyncpg.Record, points: int, balance: int) -> Outcome:
        return Outcome(
            Status.APPROVED, points_moved=points, points_balance=balance,
            cash_value_fen=cash_value_fen(balance, ctx["redeem_value"]),
            rrn=ctx["rrn"], auth_code=_auth_code(), host_time=_now(),
        )

    def _card_problem(self, ctx: asyncpg.Record, cmd: Posting, *, spending: bool) -> Status | None:
        if ctx["card_status"] is None:
            return Status.UNKNOWN_CARD
        if spending and ctx["card_status"] != "active":
            return Status.BLOCKED_CARD
        if cmd.amount_fen <= 0:
            return Status.INVALID_AMOUNT
        return None

    async def _accrue(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        problem = self._card_problem(ctx, cmd, spending=True)
        if problem:
            return await self._decline(con, ctx, cmd, problem)
        points = earned_points(cmd.amount_fen, ctx["earn_rate"])
        moved = await self._move_card(con, ctx["card_index"], points)
        assert moved is not None
        outcome = self._approved(ctx, points, moved[1])
        request_id = await self._log(con, ctx, cmd, outcome)
        await self._post(con, request_id, "accrue", ctx["issued_account_id"], moved[2], points)
        return outcome

    async def _redeem(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        problem = self._card_problem(ctx, cmd, spending=True)
        if problem is None and cmd.pin_required:
            problem = cmd.pin_refusal
        if problem:
            return await self._decline(con, ctx, cmd, problem)
        points = points_for_value(cmd.amount_fen, ctx["redeem_value"])
        moved = await self._move_card(con, ctx["card_index"], -points)
        if moved is None:
            return await self._decline(con, ctx, cmd, Status.INSUFFICIENT_POINTS, ctx["points_balance"])
        outcome = self._approved(ctx, points, moved[1])
        request_id = await self._log(con, ctx, cmd, outcome)
        await self._post(con, request_id, "redeem", moved[2], ctx["redeemed_account_id"], points)
        return outcome

    async def _original(self, con: asyncpg.Connection, cmd: Posting, ref: OriginalRef
                        ) -> asyncpg.Record | None:
        key = RequestKey(cmd.terminal_id, ref.batch, ref.trace)
        return await con.fetchrow(_ORIGINAL, str(key))

    async def _void(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        problem = self._card_problem(ctx, cmd, spending=False)
        if problem:
            return await self._decline(con, ctx, cmd, problem)
        assert cmd.original is not None
        of_accrual = cmd.operation is Operation.VOID_ACCRUAL
        target = Operation.ACCRUE if of_accrual else Operation.REDEEM
        orig = await self._original(con, cmd, cmd.original)
        if (orig is None or orig["state"] == "placeholder" or orig["operation"] != target.value
                or orig["card_index"] != ctx["card_index"]
                or (cmd.original.rrn and orig["rrn"] != cmd.original.rrn)):
            return await self._decline(con, ctx, cmd, Status.ORIGINAL_NOT_FOUND)
        if (orig["state"] != "approved" or orig["voided_by"] is not None
                or orig["reversed_at"] is not None or orig["batch"] != cmd.key.batch
                or orig["refunded_fen"] > 0):
            return await self._decline(con, ctx, cmd, Status.ORIGINAL_NOT_ELIGIBLE)
        if orig["amount_fen"] != cmd.amount_fen:
            return await self._decline(con, ctx, cmd, Status.EXCEEDS_ORIGINAL)
        points = orig["points"]
        moved = await self._move_card(con, ctx["card_index"], -points if of_accrual else points)
        if moved is None:
            return await self._decline(con, ctx, cmd, Status.INSUFFICIENT_POINTS, ctx["points_balance"])
        outcome = self._approved(ctx, points, moved[1])
        request_id = await self._log(con, ctx, cmd, outcome, original_id=orig["request_id"])
        if of_accrual:
            await self._post(con, request_id, "void", moved[2], orig["issued_account_id"], points)
        else:
            await self._post(con, request_id, "void", orig["redeemed_account_id"], moved[2], points)
        await con.execute("UPDATE requests SET voided_by = $2 WHERE request_id = $1", orig["request_id"], request_id)
        return outcome

    async def _refund(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        problem = self._card_problem(ctx, cmd, spending=False)
        if problem:
            return await self._decline(con, ctx, cmd, problem)
        assert cmd.original is not None
        orig = await self._original(con, cmd, cmd.original)
        if (orig is None or orig["state"] == "placeholder" or orig["operation"] != Operation.ACCRUE.value
                or orig["card_index"] != ctx["card_index"]):
            return await self._decline(con, ctx, cmd, Status.ORIGINAL_NOT_FOUND)
        if orig["state"] != "approved" or orig["voided_by"] is not None or orig["reversed_at"] is not None:
            return await self._decline(con, ctx, cmd, Status.ORIGINAL_NOT_ELIGIBLE)
        if cmd.amount_fen > orig["amount_fen"] - orig["refunded_fen"]:
            return await self._decline(con, ctx, cmd, Status.EXCEEDS_ORIGINAL)
        due = clawback_due(orig["points"], orig["amount_fen"], orig["refunded_fen"] + cmd.amount_fen,
                           orig["clawed_points"])
        moved = await self._move_card(con, ctx["card_index"], -due, cap=True)
        assert moved is not None
        taken = -moved[0]
        outcome = self._approved(ctx, taken, moved[1])
        request_id = await self._log(con, ctx, cmd, outcome, original_id=orig["request_id"], shortfall=due - taken)
        await self._post(con, request_id, "refund", moved[2], orig["issued_account_id"], taken)
        await con.execute(
            "UPDATE requests SET refunded_fen = refunded_fen + $2, clawed_points = clawed_points + $3"
            " WHERE request_id = $1", orig["request_id"], cmd.amount_fen, taken,
        )
        if due > taken:
            log.warning("refund clawback short", shortfall_points=due - taken, terminal=cmd.terminal_id)
        return outcome

    # -- two-phase: points leaving through an upstream host --------------------
    async def operator_account(self, con: asyncpg.Connection, name: str) -> int:
        if name not in self._operator_ids:
            rows = await con.fetch("SELECT owner, account_id FROM accounts WHERE kind = 'operator'")
            self._operator_ids.update({r["owner"]: r["account_id"] for r in rows})
        return self._operator_ids[name]

    async def _hold(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        """Check the card, PIN and limits, then move the points to the holds account
        and log the request as pending; the caller sends the upstream leg."""
        rule, leg = self.usage.get(cmd.operation), cmd.upstream
        assert rule is not None and leg is not None, "routed only where a connector and a rule exist"
        problem = self._card_problem(ctx, cmd, spending=True)
        if problem is None and cmd.amount_fen < rule.min_amount_fen:
            problem = Status.INVALID_AMOUNT
        if problem is None and cmd.pin_required:
            problem = cmd.pin_refusal
        if problem:
            return await self._decline(con, ctx, cmd, problem)
        # The card row lock serialises this card's requests, so the daily total is exact.
        await con.execute("SELECT 1 FROM cards WHERE card_index = $1 FOR UPDATE", ctx["card_index"])
        today = await con.fetchval(
            "SELECT coalesce(sum(amount_fen), 0) FROM requests WHERE card_index = $1 AND operation = $2"
            " AND state IN ('approved', 'pending') AND reversed_at IS NULL"
            " AND upstream_connector IS NOT NULL AND created_at >= date_trunc('day', now())",
            ctx["card_index"], cmd.operation.value,
        )
        if today + cmd.amount_fen > rule.daily_limit_fen:
            return await self._decline(con, ctx, cmd, Status.LIMIT_EXCEEDED, ctx["points_balance"])
        points = points_for_cash(cmd.amount_fen, rule.points_per_yuan) + rule.fee_points
        moved = await self._move_card(con, ctx["card_index"], -points)
        if moved is None:
            return await self._decline(con, ctx, cmd, Status.INSUFFICIENT_POINTS, ctx["points_balance"])
        outcome = Outcome(Status.PENDING, points_moved=points, points_balance=moved[1],
                          cash_value_fen=cash_value_fen(moved[1], ctx["redeem_value"]), rrn=ctx["rrn"],
                          host_time=_now())
        request_id = await self._log(con, ctx, cmd, outcome)
        await con.execute(
            "UPDATE requests SET upstream_connector = $2, upstream_reference = $3, reversal_sealed = $4,"
            " deadline_at = now() + make_interval(secs => $5) WHERE request_id = $1",
            request_id, leg.connector, leg.reference, self._vault.seal(leg.reversal, f"reversal:{cmd.key}"),
            leg.deadline_s,
        )
        await self._post(con, request_id, "hold", moved[2], await self.operator_account(con, "holds"), points)
        return outcome

    async def _complete_upstream(self, cmd: CompleteUpstream) -> Outcome:
        """Post (approved) or release (anything else) the hold of a pending request.
        A request sent upstream and left unanswered also gets its reversal queued,
        in the same transaction that gives the points back."""
        async with self._transaction() as con:
            row = await con.fetchrow(
                "SELECT r.*, m.redeem_value_fen_per_point AS redeem_value FROM requests r"
                " JOIN merchants m USING (merchant_id) WHERE r.request_key = $1 FOR UPDATE OF r", str(cmd.key),
            )
            if row is None:
                return Outcome(Status.ORIGINAL_NOT_FOUND, host_time=_now())
            if row["state"] != "pending":  # completed already (by the sweeper, or a late answer)
                return Outcome.from_json(row["outcome"])
            op, points, holds = Operation(row["operation"]), row["points"], await self.operator_account(con, "holds")
            if cmd.result == "approved":
                await self._post(con, row["request_id"], "payout", holds,
                                 await self.operator_account(con, _UPSTREAM_ACCOUNT[op]), points)
                balance = await con.fetchval("SELECT points_balance FROM cards WHERE card_index = $1",
                                             row["card_index"])
                outcome = Outcome(Status.APPROVED, points_moved=points, points_balance=balance,
                                  cash_value_fen=cash_value_fen(balance, row["redeem_value"]), rrn=row["rrn"],
                                  auth_code=_auth_code(), host_time=_now(),
                                  extra={"upstream_reference": cmd.upstream_reference})
                if row["reversal_requested"]:  # the terminal reversed it while it was in flight
                    await self._queue_reversal(con, row, "terminal_reversal", points)
            else:
                moved = await self._move_card(con, row["card_index"], points)
                assert moved is not None
                await self._post(con, row["request_id"], "release", holds, moved[2], points)
                status = {"declined": Status.UPSTREAM_DECLINED, "unavailable": Status.UPSTREAM_UNAVAILABLE}.get(
                    cmd.result, Status.UPSTREAM_TIMEOUT)
                outcome = Outcome(status, points_balance=moved[1],
                                  cash_value_fen=cash_value_fen(moved[1], row["redeem_value"]), rrn=row["rrn"],
                                  host_time=_now(), extra={"upstream_rc": cmd.upstream_rc})
                if cmd.result in ("timeout", "lost"):
                    await self._queue_reversal(con, row, cmd.result, 0)
            await con.execute(
                "UPDATE requests SET state = $2, status = $3, outcome = $4, upstream_rc = $5, upstream_auth = $6"
                " WHERE request_id = $1",
                row["request_id"], "approved" if outcome.approved else "declined", outcome.status.value,
                outcome.to_json(), cmd.upstream_rc or None, cmd.upstream_reference or None,
            )
        log.info("upstream leg completed", connector=row["upstream_connector"], result=cmd.result,
                 terminal=cmd.terminal_id, trace=cmd.key.trace, rc=cmd.upstream_rc, points=points)
        return outcome

    @staticmethod
    async def _queue_reversal(con: asyncpg.Connection, row: asyncpg.Record, reason: str, points_on_ack: int) -> None:
        await con.execute(
            "INSERT INTO upstream_reversals (request_id, connector, reason, message_sealed, points_on_ack)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO NOTHING",
            row["request_id"], row["upstream_connector"], reason, row["reversal_sealed"], points_on_ack,
        )
        log.info("upstream reversal queued", connector=row["upstream_connector"], reason=reason,
                 terminal=row["terminal_id"], trace=row["trace"])

    async def _reverse_upstream(self, con: asyncpg.Connection, orig: asyncpg.Record, outcome: Outcome) -> Outcome:
        """A terminal's reversal of a two-phase request. Points come back only when the
        upstream host acknowledges the reversal (store-and-forward), never before."""
        if orig["state"] == "approved":
            await self._queue_reversal(con, orig, "terminal_reversal", orig["points"])
        elif orig["state"] == "pending":
            await con.execute("UPDATE requests SET reversal_requested = true WHERE request_id = $1",
                              orig["request_id"])
        await con.execute("UPDATE requests SET reversed_at = now(), reversal_outcome = $2 WHERE request_id = $1",
                          orig["request_id"], outcome.to_json())
        return outcome

    # -- reversal ------------------------------------------------------------
    async def _reverse(self, cmd: Reverse) -> Outcome:
        async with self._transaction() as con:
            ctx = await self._context(con, cmd, self._vault.card_index(cmd.card_number))
            if isinstance(ctx, Outcome):
                return ctx
            balance = ctx["points_balance"]
            outcome = Outcome(
                Status.APPROVED, points_balance=balance,
                cash_value_fen=None if balance is None else cash_value_fen(balance, ctx["redeem_value"]),
                rrn=ctx["rrn"], host_time=_now(),
            )
            # A reversal for a key never seen: acknowledge it and remember it,
            # so that the late original finds the key taken and is not posted. No
            # balance: nothing ties this card to the terminal (it may not even exist).
            remembered = replace(outcome, points_balance=None, cash_value_fen=None)
            placeholder = await con.fetchval(
                "INSERT INTO requests (request_key, operation, state, status, terminal_id, merchant_id,"
                " card_index, amount_fen, batch, trace, rrn, outcome, reversed_at, reversal_outcome)"
                " VALUES ($1, $2, 'placeholder', 'approved', $3, $4, $5, $6, $7, $8, $9, $10, now(), $10)"
                " ON CONFLICT (request_key) DO NOTHING RETURNING request_id",
                str(cmd.key), cmd.operation.value, cmd.terminal_id, cmd.merchant_id, ctx["card_index"],
                cmd.amount_fen, cmd.key.batch, cmd.key.trace, ctx["rrn"], remembered.to_json(),
            )
            if placeholder is not None:
                log.info("reversal before original remembered", terminal=cmd.terminal_id, trace=cmd.key.trace)
                return remembered
            orig = await con.fetchrow(_ORIGINAL, str(cmd.key))
            assert orig is not None
            if orig["reversed_at"] is not None:
                return Outcome.from_json(orig["reversal_outcome"])
            if orig["operation"] != cmd.operation.value or orig["card_index"] != ctx["card_index"]:
                return replace(outcome, status=Status.ORIGINAL_NOT_FOUND)
            if cmd.operation in UPSTREAM_OPERATIONS:
                return await self._reverse_upstream(con, orig, outcome)
            points, shortfall = 0, 0
            if orig["state"] == "approved":
                points, shortfall, balance = await self._undo(con, orig)
                outcome = replace(outcome, points_moved=points, points_balance=balance,
                                  cash_value_fen=cash_value_fen(balance, ctx["redeem_value"]))
            await con.execute(
                "UPDATE requests SET reversed_at = now(), reversal_outcome = $2,"
                " shortfall_points = shortfall_points + $3 WHERE request_id = $1",
                orig["request_id"], outcome.to_json(), shortfall,
            )
            if shortfall:
                log.warning("reversal clawback short", shortfall_points=shortfall, terminal=cmd.terminal_id)
            return outcome

    async def _undo(self, con: asyncpg.Connection, orig: asyncpg.Record) -> tuple[int, int, int]:
        """Undo an approved transaction's effect on the card. Returns (points moved,
        shortfall, new balance). What was already undone by something else (a void,
        a reversal of the transaction a void or refund points at) is not undone twice."""
        op = Operation(orig["operation"])
        card = orig["card_index"]
        target = None
        if orig["original_request_id"] is not None:  # voids and refunds point at an original
            target = await con.fetchrow(
                "SELECT * FROM requests WHERE request_id = $1 FOR UPDATE", orig["original_request_id"]
            )
        already_undone = (
            (target is not None and target["reversed_at"] is not None)
            or (op in (Operation.ACCRUE, Operation.REDEEM) and orig["voided_by"] is not None)
        )
        if already_undone:
            balance = await con.fetchval("SELECT points_balance FROM cards WHERE card_index = $1", card)
            return 0, 0, balance
        # The original's effect on the card balance; the reversal applies its negative.
        effect = {
            Operation.ACCRUE: orig["points"] - orig["clawed_points"],
            Operation.REDEEM: -orig["points"],
            Operation.VOID_ACCRUAL: -orig["points"],
            Operation.VOID_REDEMPTION: orig["points"],
            Operation.REFUND: -orig["points"],
        }[op]
        moved = await self._move_card(con, card, -effect, cap=True)
        assert moved is not None
        applied, balance, card_account = moved
        merchant_account = (
            orig["redeemed_account_id"]
            if op in (Operation.REDEEM, Operation.VOID_REDEMPTION)
            else orig["issued_account_id"]
        )
        if applied < 0:
            await self._post(con, orig["request_id"], "reversal", card_account, merchant_account, -applied)
        else:
            await self._post(con, orig["request_id"], "reversal", merchant_account, card_account, applied)
        if op in (Operation.VOID_ACCRUAL, Operation.VOID_REDEMPTION):
            await con.execute("UPDATE requests SET voided_by = NULL WHERE request_id = $1",
                              orig["original_request_id"])
        elif op is Operation.REFUND:
            await con.execute(
                "UPDATE requests SET refunded_fen = refunded_fen - $2, clawed_points = clawed_points - $3"
                " WHERE request_id = $1", orig["original_request_id"], orig["amount_fen"], orig["points"],
            )
        return abs(applied), abs(effect) - abs(applied), balance


_UPSTREAM_ACCOUNT = {Operation.CASH_OUT: "cash_out", Operation.INSURANCE: "insurance"}


_STEPS: dict[Operation, Callable[[Ledger, asyncpg.Connection, asyncpg.Record, Posting], Awaitable[Outcome]]] = {
    Operation.ACCRUE: Ledger._accrue,
    Operation.REDEEM: Ledger._redeem,
    Operation.VOID_ACCRUAL: Ledger._void,
    Operation.VOID_REDEMPTION: Ledger._void,
    Operation.REFUND: Ledger._refund,
    Operation.CASH_OUT: Ledger._hold,
    Operation.INSURANCE: Ledger._hold,
}
