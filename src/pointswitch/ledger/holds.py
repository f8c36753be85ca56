"""Two-phase: points leaving the network through an upstream host (cash to a bank
card, an insurance premium). The hold moves the points to the operator's
``holds`` account; the host's answer posts them on (approved) or releases them
(anything else, with the reversal queued when the leg may have arrived).
"""

from __future__ import annotations

import asyncpg
import structlog

from .core import _BUSINESS_DATE, _auth_code, _day, _now, cash_value_fen, points_for_cash
from .decide import card_refusal
from .lots import LotSteps
from .model import CompleteUpstream, Operation, Outcome, Posting, Status

log = structlog.get_logger("pointswitch.ledger")

_UPSTREAM_ACCOUNT = {Operation.CASH_OUT: "cash_out", Operation.INSURANCE: "insurance"}


class HoldSteps(LotSteps):
    async def _hold(self, con: asyncpg.Connection, ctx: asyncpg.Record, cmd: Posting) -> Outcome:
        """Check the card, PIN and limits, then move the points to the holds account
        and log the request as pending; the caller sends the upstream leg."""
        rule, leg = self.usage.get(cmd.operation), cmd.upstream
        assert rule is not None and leg is not None, "routed only where a connector and a rule exist"
        problem = card_refusal(ctx, cmd, spending=True)
        if problem is None and cmd.amount_fen < rule.min_amount_fen:
            problem = Status.INVALID_AMOUNT
        if problem is None and cmd.pin_required:
            problem = cmd.pin_refusal
        if problem:
            return await self._decline(con, ctx, cmd, problem)
        # The card row lock serialises this card's requests, so the daily total is exact
        # (the PIN check took it already).
        if not cmd.pin_required:
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
        spent = await self._spend(con, ctx["card_index"], points)  # from the lots that expire first
        if spent is None:
            return await self._decline(con, ctx, cmd, Status.INSUFFICIENT_POINTS, ctx["points_balance"])
        outcome = Outcome(Status.PENDING, points_moved=points, points_balance=spent.balance,
                          cash_value_fen=cash_value_fen(spent.balance, ctx["redeem_value"]), rrn=ctx["rrn"],
                          host_time=_now(), business_date=_day(ctx))
        request_id = await self._log(con, ctx, cmd, outcome, upstream=True)
        await self._post_drawn(con, request_id, "hold", spent.account, await self.operator_account(con, "holds"),
                               points, spent)
        return outcome

    async def _complete_upstream(self, cmd: CompleteUpstream) -> Outcome:
        """Post (approved) or release (anything else) the hold of a pending request.
        A request sent upstream and left unanswered also gets its reversal queued,
        in the same transaction that gives the points back."""
        async with self._transaction() as con:
            day = await con.fetchval(_BUSINESS_DATE)  # first, as every posting transaction: lock order
            row = await con.fetchrow(
                "SELECT r.*, m.redeem_value_fen_per_point AS redeem_value, c.points_balance FROM requests r"
                " JOIN merchants m USING (merchant_id) JOIN cards c USING (card_index)"
                " WHERE r.request_key = $1 FOR UPDATE OF r", str(cmd.key),
            )
            if row is None:
                return Outcome(Status.ORIGINAL_NOT_FOUND, host_time=_now())
            if row["state"] != "pending":  # completed already (by the sweeper, or a late answer)
                return Outcome.from_json(row["outcome"])
            op, points, holds = Operation(row["operation"]), row["points"], await self.operator_account(con, "holds")
            if cmd.result == "approved":
                await self._post(con, row["request_id"], "payout", holds,
                                 await self.operator_account(con, _UPSTREAM_ACCOUNT[op]), points)
                balance = row["points_balance"]  # the points left the card with the hold
                outcome = Outcome(Status.APPROVED, points_moved=points, points_balance=balance,
                                  cash_value_fen=cash_value_fen(balance, row["redeem_value"]), rrn=row["rrn"],
                                  auth_code=_auth_code(), host_time=_now(), business_date=day.isoformat(),
                                  extra={"upstream_reference": cmd.upstream_reference})
                if row["reversal_requested"]:  # the terminal reversed it while it was in flight
                    await self._queue_reversal(con, row, "terminal_reversal", points)
            else:
                # The hold's draws go back to their lots, with their original expiry.
                moved = await self._give_back(con, row["card_index"], row["request_id"], points, day)
                await self._post(con, row["request_id"], "release", holds, moved.account, points)
                status = {"declined": Status.UPSTREAM_DECLINED, "unavailable": Status.UPSTREAM_UNAVAILABLE}.get(
                    cmd.result, Status.UPSTREAM_TIMEOUT)
                outcome = Outcome(status, points_balance=moved.balance,
                                  cash_value_fen=cash_value_fen(moved.balance, row["redeem_value"]), rrn=row["rrn"],
                                  host_time=_now(), business_date=day.isoformat(),
                                  extra={"upstream_rc": cmd.upstream_rc})
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
