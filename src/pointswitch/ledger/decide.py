"""Deciding a request, without a database: what the card's balance does, what is
posted, and what the terminal is told.

The write steps (``group``) read the context of many requests at once, call
these functions in the order the requests arrived, and write what they decided
in a few set-based statements. Being pure, they are tested directly against an
independent model (``tests/test_decide.py``), thousands of cases a second.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from .model import Command, ExpiryRule, Outcome, Posting, Reverse, Status

Context = Mapping[str, Any]


def earned_points(amount_fen: int, earn_rate_points_per_yuan: Decimal) -> int:
    """floor(amount in fen x earn rate / 100)."""
    return int((Decimal(amount_fen) * earn_rate_points_per_yuan / 100).to_integral_value(ROUND_FLOOR))


def cash_value_fen(points: int, value_fen_per_point: Decimal) -> int:
    return int((Decimal(points) * value_fen_per_point).to_integral_value(ROUND_FLOOR))


def terminal_refusal(ctx: Context | None, cmd: Command) -> Status | None:
    """Why the terminal may not post this at all (not logged: the key belongs to no
    open batch of a known terminal of that merchant), or None."""
    if ctx is None or ctx["terminal_status"] is None:
        return Status.UNKNOWN_TERMINAL
    if ctx["merchant_id"] != cmd.merchant_id or ctx["merchant_status"] != "active":
        return Status.WRONG_MERCHANT
    if ctx["terminal_status"] != "active":
        return Status.TERMINAL_DISABLED
    # The switch owns the batch: only the open one posts (a settlement closed the others).
    if isinstance(cmd, Posting | Reverse) and cmd.key.batch != ctx["current_batch"]:
        return Status.BATCH_MISMATCH
    return None


def card_refusal(ctx: Context, cmd: Posting, *, spending: bool) -> Status | None:
    """Why the card cannot take this posting (logged under the key), or None."""
    if ctx["card_status"] is None:
        return Status.UNKNOWN_CARD
    if spending and ctx["card_status"] != "active":
        return Status.BLOCKED_CARD
    if cmd.amount_fen <= 0:
        return Status.INVALID_AMOUNT
    return None


def expiry_date(rule: ExpiryRule, earned_on: datetime.date) -> datetime.date | None:
    """The last business date on which points earned on ``earned_on`` are valid
    (docs/expiry.md): "months" later less a day, or Dec 31 of the year + ``years``."""
    import calendar

    if rule.policy == "months":
        month0 = earned_on.month - 1 + rule.months
        year, month = earned_on.year + month0 // 12, month0 % 12 + 1
        day = min(earned_on.day, calendar.monthrange(year, month)[1])
        return datetime.date(year, month, day) - datetime.timedelta(days=1)
    if rule.policy == "end_of_year":
        return datetime.date(earned_on.year + rule.years, 12, 31)
    return None


def next_expiry(dated: tuple[datetime.date, int] | None, expires: datetime.date | None, points: int
                ) -> dict[str, Any] | None:
    """What expires next on a card (for the member, field 44), counting a new lot of
    ``points`` expiring on ``expires`` beside the soonest of the others (``dated``)."""
    nxt_date, nxt_points = dated if dated is not None else (None, 0)
    if expires is not None and points > 0:
        if nxt_date is None or expires < nxt_date:
            nxt_date, nxt_points = expires, points
        elif expires == nxt_date:
            nxt_points += points
    return {"date": nxt_date.isoformat(), "points": int(nxt_points)} if nxt_date is not None else None


@dataclass(frozen=True)
class Decision:
    """What one request does: its outcome, whether it is logged under its key, and
    for an approval the points it adds to the card and the lot they make."""

    outcome: Outcome
    logged: bool
    points: int = 0
    expires_on: datetime.date | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def decide_accrual(ctx: Context | None, cmd: Posting, *, balance: int | None, dated: tuple[datetime.date, int] | None,
                   expiry: ExpiryRule, host_time: str, auth_code: str) -> Decision:
    """An accrual on purchase, given the context read under lock and the card's
    balance so far (earlier requests of the same batch included)."""
    refusal = terminal_refusal(ctx, cmd)
    if refusal is not None:
        return Decision(Outcome(refusal, host_time=host_time), logged=False)
    assert ctx is not None
    day = ctx["business_date"].isoformat()
    problem = card_refusal(ctx, cmd, spending=True)
    if problem is not None:
        return Decision(Outcome(problem, rrn=ctx["rrn"], host_time=host_time, business_date=day), logged=True)
    assert balance is not None
    points = earned_points(cmd.amount_fen, ctx["earn_rate"])
    after = balance + points
    expires = expiry_date(expiry, ctx["business_date"])
    outcome = Outcome(Status.APPROVED, points_moved=points, points_balance=after,
                      cash_value_fen=cash_value_fen(after, ctx["redeem_value"]), rrn=ctx["rrn"],
                      auth_code=auth_code, host_time=host_time, business_date=day)
    told = next_expiry(dated, expires, points)
    if told is not None:
        outcome.extra["next_expiry"] = told
    return Decision(outcome, logged=True, points=points, expires_on=expires)
