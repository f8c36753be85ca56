"""Postings made at the terminal: inquiry, accrual, redemption, void and refund.

Each runs inside the transaction :meth:`Ledger._posting` opened (or, for an
inquiry, one of its own), after the context was read.
"""

from __future__ import annotations

import asyncpg
import structlog

from .core import _auth_code, _day, _now, clawback_due, points_for_value
from .decide import card_refusal, cash_value_fen, earned_points
from .lots import LotSteps
from .model import Inquire, Operation, Outcome, Posting, Status
from .pins import LegacyPin

log = structlog.get_logger("pointswitch.ledger")


class PostingSteps(LotSteps):
    async def _inquire(self, cmd: Inquire) -> Outcome:
        card_index = self._vault.card_index(cmd.card_number)
        try:
            return await self._inquire_once(cmd, card_index, None, pin_checked=False)
        except LegacyPin:  # an old-form PIN hash: checked outside the transaction
            refusal = await self._pins.check(cmd.card_number, card_index, cmd.pin)
            return await self._inquire_once(cmd, card_index, refusal, pin_checked=True)

    async def _inquire_once(self, cmd: Inquire, card_index: str, pin_refusal: Status | None, *,
                            pin_checked: bool) -> Outcome:
        async with self._transaction() as con:
            ctx = await self._context(con, cmd, card_index)
            if isinstance(ctx, Outcome):
                return ctx
            if ctx["card_status"] is None:
                return Outcome(Status.UNKNOWN_CARD, rrn=ctx["rrn"], host_time=_now())
            if ctx["card_status"] != "active":
                return Outcome(Status.BLOCKED_CARD, rrn=ctx["rrn"], host_time=_now())
            if cmd.pin_required and not pin_checked:
                pin_refusal = await self._pins.check_locked(con, cmd.card_number, card_index, cmd.pin)
            if pin_refusal:
                return Outcome(pin_refusal, rrn=ctx["rrn"], host_time=_now())
        balance = ctx["points_balance"]
        return Outcome(
            Status.APPROVED, points_balance=balance,
            cash_value_fen=cash_value_fen(balance, ctx["redeem_value"]),
            rrn=ctx["rrn"], auth_code=_auth_code(), host_time=_now(), business_date=_day(ctx),
        )

    async def _accrue(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        problem = card_refusal(ctx, cmd, spending=True)
        if problem:
            return await self._decline(con, ctx, cmd, problem)
        points = earned_points(cmd.amount_fen, ctx["earn_rate"])
        day = ctx["business_date"]
        balance, account, expires, next_expiry = await self._earn(con, ctx["card_index"], points, day)
        outcome = self._approved(ctx, points, balance)
        if next_expiry is not None:  # the member is told what expires next (field 44)
            outcome.extra["next_expiry"] = next_expiry
        request_id = await self._log(con, ctx, cmd, outcome)
        await self._post_earned(con, request_id, ctx["issued_account_id"], account, points, ctx["card_index"],
                                day, expires)
        return outcome

    async def _redeem(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        problem = card_refusal(ctx, cmd, spending=True)
        if problem is None and cmd.pin_required:
            problem = cmd.pin_refusal
        if problem:
            return await self._decline(con, ctx, cmd, problem)
        points = points_for_value(cmd.amount_fen, ctx["redeem_value"])
        spent = await self._spend(con, ctx["card_index"], points)  # from the lots that expire first
        if spent is None:
            return await self._decline(con, ctx, cmd, Status.INSUFFICIENT_POINTS, ctx["points_balance"])
        outcome = self._approved(ctx, points, spent.balance)
        request_id = await self._log(con, ctx, cmd, outcome)
        await self._post_drawn(con, request_id, "redeem", spent.account, ctx["redeemed_account_id"], points, spent)
        return outcome

    async def _void(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        problem = card_refusal(ctx, cmd, spending=False)
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
        if of_accrual:  # takes back what is left of the accrual's lot; the rest is a shortfall
            moved = await self._take_lot(con, ctx["card_index"], orig["request_id"], points)
        else:  # the redemption's points go back to the lots they were drawn from
            moved = await self._give_back(con, ctx["card_index"], orig["request_id"], points, ctx["business_date"])
        assert moved.applied is not None
        outcome = self._approved(ctx, moved.applied, moved.balance)
        shortfall = points - moved.applied
        request_id = await self._log(con, ctx, cmd, outcome, original_id=orig["request_id"], shortfall=shortfall)
        if of_accrual:
            await self._post_drawn(con, request_id, "void", moved.account, orig["issued_account_id"], moved.applied,
                                   moved)
        else:
            await self._post(con, request_id, "void", orig["redeemed_account_id"], moved.account, points)
        await con.execute("UPDATE requests SET voided_by = $2 WHERE request_id = $1", orig["request_id"], request_id)
        if shortfall:
            log.warning("void clawback short", shortfall_points=shortfall, terminal=cmd.terminal_id)
        return outcome

    async def _refund(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        problem = card_refusal(ctx, cmd, spending=False)
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
        # Only what is left of the accrual's lot: points spent or expired are a shortfall.
        moved = await self._take_lot(con, ctx["card_index"], orig["request_id"], due)
        assert moved.applied is not None
        taken = moved.applied
        outcome = self._approved(ctx, taken, moved.balance)
        request_id = await self._log(con, ctx, cmd, outcome, original_id=orig["request_id"], shortfall=due - taken)
        await self._post_drawn(con, request_id, "refund", moved.account, orig["issued_account_id"], taken, moved)
        await con.execute(
            "UPDATE requests SET refunded_fen = refunded_fen + $2, clawed_points = clawed_points + $3"
            " WHERE request_id = $1", orig["request_id"], cmd.amount_fen, taken,
        )
        if due > taken:
            log.warning("refund clawback short", shortfall_points=due - taken, terminal=cmd.terminal_id)
        return outcome
