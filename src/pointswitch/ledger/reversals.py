"""Reversals (0400): undo the original by its key, exactly once; remember a
reversal whose original was never seen, so that the late original is not posted.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date

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
                points, shortfall, balance = await self._undo(con, orig, ctx["business_date"])
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

    async def _undo(self, con: asyncpg.Connection, orig: asyncpg.Record, day: date) -> tuple[int, int, int]:
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
        request_id, points = orig["request_id"], orig["points"]
        if op is Operation.ACCRUE:  # only what is left of the accrual's own lot; the rest is a shortfall
            wanted = points - orig["clawed_points"]
            moved = await self._take_lot(con, card, request_id, wanted)
            assert moved.applied is not None
            await self._post_drawn(con, request_id, "reversal", moved.account, orig["issued_account_id"],
                                   moved.applied, moved)
            return moved.applied, wanted - moved.applied, moved.balance
        if op is Operation.VOID_REDEMPTION:
            # The void gave the redemption's points back: the redemption stands again, so
            # they are spent again (what the card has, the lots that expire first), drawn
            # under the redemption, which a later void or reversal gives back.
            spent = await self._spend(con, card, points, cap=True)
            assert spent is not None and spent.applied is not None
            await self._post_drawn(con, request_id, "reversal", spent.account, orig["redeemed_account_id"],
                                   spent.applied, spent, draws_of=orig["original_request_id"])
            await con.execute("UPDATE requests SET voided_by = NULL WHERE request_id = $1",
                              orig["original_request_id"])
            return spent.applied, points - spent.applied, spent.balance
        # A redemption, a void of an accrual, a refund: what it drew goes back to the
        # lots it came from (an accrual's lot, for the last two), with their expiry.
        moved = await self._give_back(con, card, request_id, points, day)
        merchant_account = orig["redeemed_account_id"] if op is Operation.REDEEM else orig["issued_account_id"]
        await self._post(con, request_id, "reversal", merchant_account, moved.account, points)
        if op is Operation.VOID_ACCRUAL:
            await con.execute("UPDATE requests SET voided_by = NULL WHERE request_id = $1",
                              orig["original_request_id"])
        elif op is Operation.REFUND:
            await con.execute(
                "UPDATE requests SET refunded_fen = refunded_fen - $2, clawed_points = clawed_points - $3"
                " WHERE request_id = $1", orig["original_request_id"], orig["amount_fen"], points,
            )
        return points, 0, moved.balance
