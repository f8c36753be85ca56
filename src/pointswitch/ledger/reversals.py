"""Reversals (0400): undo the original by its key, exactly once; remember a
reversal whose original was never seen, so that the late original is not posted.
"""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import structlog

from .core import _ORIGINAL, _day, _now, cash_value_fen
from .holds import HoldSteps
from .model import UPSTREAM_OPERATIONS, Operation, Outcome, Reverse, Status

log = structlog.get_logger("pointswitch.ledger")


class ReversalSteps(HoldSteps):
    async def _reverse(self, cmd: Reverse) -> Outcome:
        async with self._transaction() as con:
            ctx = await self._context(con, cmd, self._vault.card_index(cmd.card_number))
            if isinstance(ctx, Outcome):
                return ctx
            balance = ctx["points_balance"]
            outcome = Outcome(
                Status.APPROVED, points_balance=balance,
                cash_value_fen=None if balance is None else cash_value_fen(balance, ctx["redeem_value"]),
                rrn=ctx["rrn"], host_time=_now(), business_date=_day(ctx),
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
