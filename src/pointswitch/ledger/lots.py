"""Points lots: what each accrual earned, when it expires, and what took from it.

Every accrual is a lot on its card (``point_lots``, migration 0011) with the
business date it was earned on and the last business date its points are valid
(``expiry_date``; NULL: never). The card's balance stays the one number a spend
checks (the conditional UPDATE on the card row, as before); the lots say *which*
points a balance is made of:

- a spend (redemption, cash-out or premium hold) draws from the lots that expire
  first, never-expiring last, ties by lot id, and records its draws;
- a void, refund or reversal of an accrual takes back only what is left of that
  accrual's own lot (the rest is a shortfall: the member spent it, or it expired);
- giving a spend back (its void or reversal, a released hold, an upstream
  reversal acknowledged) returns its draws to the lots they came from, with their
  original expiry;
- the expiry run (``expire_due``) moves what is left of lots past their date to
  the operator's ``expired`` account (breakage) by ordinary postings.

Each of these is one SQL function (migration 0011) that takes the card row lock
first and then touches the lots, so one round trip does what ``_move_card`` did
and lock order stays card, then lots. Draws are recorded with the request's
posting (one statement), since the request row exists only after the move.
Invariant: for every card, the sum of its lots' points left = its balance.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from .core import LedgerCore
from .decide import expiry_date, next_expiry

log = structlog.get_logger("pointswitch.ledger")

POLICIES = ("never", "months", "end_of_year")

_POST_DRAWN = """
WITH drawn AS (
    INSERT INTO lot_draws (request_id, lot_id, points)
    SELECT $1, d.lot_id, d.points FROM unnest($6::bigint[], $7::bigint[]) AS d(lot_id, points)
)
INSERT INTO postings (request_id, reason, debit_account_id, credit_account_id, amount_points)
VALUES ($1, $2, $3, $4, $5)
"""

_POST_EARNED = """
WITH lot AS (
    INSERT INTO point_lots (card_index, request_id, origin, earned_on, expires_on, points_earned, points_left)
    VALUES ($6, $1, 'accrual', $7, $8, $5, $5)
)
INSERT INTO postings (request_id, reason, debit_account_id, credit_account_id, amount_points)
VALUES ($1, $2, $3, $4, $5)
"""

_DRAWS_ONLY = """
INSERT INTO lot_draws (request_id, lot_id, points)
SELECT $1, d.lot_id, d.points FROM unnest($2::bigint[], $3::bigint[]) AS d(lot_id, points)
"""


@dataclass(frozen=True)
class Moved:
    """What a lot-aware move did to a card: points applied (None: no such card, or
    too few points), the new balance, the card's account and the lots drawn."""

    applied: int | None
    balance: int
    account: int
    lot_ids: list[int]
    lot_points: list[int]

    @classmethod
    def of(cls, row: asyncpg.Record) -> Moved:
        return cls(row["applied"], row["balance"], row["account_id"], list(row.get("lot_ids") or []),
                   list(row.get("lot_points") or []))


class LotSteps(LedgerCore):
    """The lot-aware card moves every step uses instead of ``_move_card``."""

    async def _earn(self, con: asyncpg.Connection, card: str, points: int, earned_on: datetime.date
                    ) -> tuple[int, int, datetime.date | None, dict[str, Any] | None]:
        """Add an accrual's points to the card. Returns (balance, account, the new lot's
        expiry, what expires next on the card counting the new lot, or None)."""
        row = await con.fetchrow("SELECT * FROM card_earn($1, $2)", card, points)
        assert row is not None and row["balance"] is not None
        expires = expiry_date(self.expiry, earned_on)
        dated = (row["next_date"], int(row["next_points"])) if row["next_date"] is not None else None
        return row["balance"], row["account_id"], expires, next_expiry(dated, expires, points)

    async def _post_earned(self, con: asyncpg.Connection, request_id: int, debit: int, credit: int, points: int,
                           card: str, earned_on: datetime.date, expires_on: datetime.date | None) -> None:
        """The accrual's posting and its lot, in one statement."""
        if points:
            await con.execute(_POST_EARNED, request_id, "accrue", debit, credit, points, card, earned_on, expires_on)

    async def _spend(self, con: asyncpg.Connection, card: str, points: int, *, cap: bool = False) -> Moved | None:
        """Take ``points`` off the card, drawn from the lots that expire first. None when
        the card has too few (with ``cap``: take what it has)."""
        row = await con.fetchrow("SELECT * FROM card_spend($1, $2, $3)", card, points, cap)
        if row is None or row["applied"] is None:
            return None
        return Moved.of(row)

    async def _take_lot(self, con: asyncpg.Connection, card: str, accrual_id: int, points: int) -> Moved:
        """Take back up to ``points`` of an accrual: only what is left of its own lot."""
        row = await con.fetchrow("SELECT * FROM card_take_lot($1, $2, $3)", card, accrual_id, points)
        assert row is not None and row["applied"] is not None, "the card of a logged request exists"
        return Moved.of(row)

    async def _give_back(self, con: asyncpg.Connection, card: str, request_id: int, points: int,
                         day: datetime.date) -> Moved:
        """Give a spend's (or a take-back's) points back to the lots it drew them from."""
        row = await con.fetchrow("SELECT * FROM card_give_back($1, $2, $3, $4)", card, request_id, points, day)
        assert row is not None and row["applied"] is not None, "the card of a logged request exists"
        return Moved.of(row)

    async def _post_drawn(self, con: asyncpg.Connection, request_id: int, reason: str, debit: int, credit: int,
                          points: int, moved: Moved, *, draws_of: int | None = None) -> None:
        """A posting and the draws behind it, in one statement. The draws are recorded
        under ``draws_of`` when given (the request that owns them), else the posting's."""
        assert points >= 0 and debit != credit
        if draws_of is not None and draws_of != request_id:
            await self._post(con, request_id, reason, debit, credit, points)
            if moved.lot_ids:
                await con.execute(_DRAWS_ONLY, draws_of, moved.lot_ids, moved.lot_points)
        elif points:
            await con.execute(_POST_DRAWN, request_id, reason, debit, credit, points, moved.lot_ids,
                              moved.lot_points)

    async def expire_due(self, day: datetime.date, *, chunk: int = 500) -> dict[str, int]:
        """Expire every lot with ``expires_on <= day`` and points left: the day close
        calls it for a day already cut off. Postings and request rows are dated ``day``
        explicitly (business_date_now() would say the next day, and is not asked).

        One request per card and day (``expiry:<day>:<card index>``), so a second run,
        or a run after a crash half-way, expires nothing twice. Cards go in chunks of
        ``chunk``, each in a short transaction of its own (card row, then its lots), in
        card index order, so spends on other cards go on. Returns {"points", "cards"}."""
        total, cards, after = 0, 0, ""
        while True:
            async with self._pool.acquire() as con:
                expired_account = await self.operator_account(con, "expired")
                batch = [r["card_index"] for r in await con.fetch(
                    "SELECT DISTINCT card_index FROM point_lots WHERE points_left > 0 AND expires_on <= $1"
                    " AND card_index > $2 ORDER BY card_index LIMIT $3", day, after, chunk)]
                if not batch:
                    break
                async with con.transaction():
                    done = await con.fetch(
                        "SELECT card_expire(c, $1, $2) AS points FROM unnest($3::text[]) WITH ORDINALITY AS u(c, n)"
                        " ORDER BY n", day, expired_account, batch)
            after = batch[-1]
            points = [r["points"] for r in done if r["points"]]
            total, cards = total + sum(points), cards + len(points)
        log.info("points expired", business_date=day.isoformat(), points=total, cards=cards)
        return {"points": total, "cards": cards}


async def card_expiries(con: asyncpg.Connection, card_index: str) -> dict[str, Any]:
    """A card's points by expiry date (ISO date -> points, soonest first) and never expiring."""
    rows = await con.fetch(
        "SELECT expires_on, sum(points_left) AS points FROM point_lots WHERE card_index = $1 AND points_left > 0"
        " GROUP BY expires_on ORDER BY expires_on NULLS LAST", card_index)
    dated = {r["expires_on"].isoformat(): int(r["points"]) for r in rows if r["expires_on"] is not None}
    never = sum(int(r["points"]) for r in rows if r["expires_on"] is None)
    return {"expiring": dated, "never_expiring": never}
