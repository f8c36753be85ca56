"""Operator functions over merchants: add, update (rates, status), show, list.

Every change records one audit entry in its own transaction.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg

from . import audit
from .errors import AdminError


def _decimal(value: Any, what: str) -> Decimal:
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise AdminError(f"{what} must be a number") from None
    if d < 0 or d != d.quantize(Decimal("0.0001")):
        raise AdminError(f"{what} must be >= 0 with at most 4 decimals")
    return d


async def account(con: asyncpg.Connection, kind: str, owner: str) -> int:
    return int(await con.fetchval(
        "INSERT INTO accounts (kind, owner) VALUES ($1, $2)"
        " ON CONFLICT (kind, owner) DO UPDATE SET owner = EXCLUDED.owner RETURNING account_id",
        kind, owner,
    ))


# -- merchants ---------------------------------------------------------------------
def merchant_rates(earn_rate: Any, issue_price: Any, redeem_value: Any) -> tuple[Decimal, Decimal, Decimal]:
    rate = _decimal(earn_rate, "earn rate")
    price = _decimal(issue_price, "issue price")
    value = _decimal(redeem_value, "redemption value")
    if value == 0:
        raise AdminError("redemption value per point must be above zero")
    return rate, price, value


async def insert_merchant(con: asyncpg.Connection, merchant_id: str, name: str, rate: Decimal, price: Decimal,
                           value: Decimal) -> None:
    issued = await account(con, "merchant_issued", merchant_id)
    redeemed = await account(con, "merchant_redeemed", merchant_id)
    try:
        await con.execute(
            "INSERT INTO merchants (merchant_id, name, earn_rate_points_per_yuan,"
            " issue_price_fen_per_point, redeem_value_fen_per_point, issued_account_id,"
            " redeemed_account_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            merchant_id, name, rate, price, value, issued, redeemed,
        )
    except asyncpg.UniqueViolationError:
        raise AdminError(f"merchant {merchant_id} exists") from None


async def add_merchant(con: asyncpg.Connection, merchant_id: str, name: str, earn_rate: Any,
                       issue_price: Any = 1, redeem_value: Any = 1) -> dict[str, Any]:
    if not re.fullmatch(r"[\x21-\x7e]{1,15}", merchant_id):
        raise AdminError("a merchant id is 1 to 15 printable characters (field 42)")
    rate, price, value = merchant_rates(earn_rate, issue_price, redeem_value)
    async with con.transaction():
        await insert_merchant(con, merchant_id, name, rate, price, value)
        await audit.record(con, "merchant.add", merchant_id, {
            "name": name, "earn_rate_points_per_yuan": str(rate), "issue_price_fen_per_point": str(price),
            "redeem_value_fen_per_point": str(value)})
    return await get_merchant(con, merchant_id)


_MERCHANT_COLUMNS = ("name", "earn_rate_points_per_yuan", "issue_price_fen_per_point", "redeem_value_fen_per_point",
                     "status")


async def update_merchant(con: asyncpg.Connection, merchant_id: str, *, name: str | None = None,
                          earn_rate: Any = None, issue_price: Any = None, redeem_value: Any = None,
                          status: str | None = None) -> dict[str, Any]:
    """Change a merchant's name, rates or status (``active``, ``suspended``: its
    terminals are declined 03). Only what is given changes; nothing given is refused."""
    if status is not None and status not in ("active", "suspended"):
        raise AdminError("merchant status is active or suspended")
    async with con.transaction():
        row = await con.fetchrow("SELECT * FROM merchants WHERE merchant_id = $1 FOR UPDATE", merchant_id)
        if row is None:
            raise AdminError(f"no merchant {merchant_id}")
        given = [name, earn_rate, issue_price, redeem_value, status]
        if all(v is None for v in given):
            raise AdminError("nothing to change: give a name, a rate or a status")
        old = [row[c] for c in _MERCHANT_COLUMNS]
        rate, price, value = merchant_rates(*(old[i] if given[i] is None else given[i] for i in (1, 2, 3)))
        new = [name if name is not None else row["name"], rate, price, value, status or row["status"]]
        changes = {c: [_shown(o), _shown(n)] for c, o, n in zip(_MERCHANT_COLUMNS, old, new, strict=True) if o != n}
        if changes:
            await con.execute(
                "UPDATE merchants SET name = $2, earn_rate_points_per_yuan = $3, issue_price_fen_per_point = $4,"
                " redeem_value_fen_per_point = $5, status = $6 WHERE merchant_id = $1", merchant_id, *new)
            await audit.record(con, "merchant.update", merchant_id, {"changes": changes})
    return await get_merchant(con, merchant_id)


def _shown(value: Any) -> str:
    return str(value.normalize()) if isinstance(value, Decimal) else str(value)


async def get_merchant(con: asyncpg.Connection, merchant_id: str) -> dict[str, Any]:
    row = await con.fetchrow(_MERCHANTS + " WHERE m.merchant_id = $1", merchant_id)
    if row is None:
        raise AdminError(f"no merchant {merchant_id}")
    return _merchant(row)


_MERCHANTS = """
SELECT m.merchant_id, m.name, m.earn_rate_points_per_yuan, m.issue_price_fen_per_point,
       m.redeem_value_fen_per_point, m.status,
       (SELECT count(*) FROM terminals t WHERE t.merchant_id = m.merchant_id) AS terminals,
       -(SELECT balance_points FROM account_balances WHERE account_id = m.issued_account_id) AS points_issued,
       (SELECT balance_points FROM account_balances WHERE account_id = m.redeemed_account_id) AS points_redeemed
FROM merchants m
"""


def _merchant(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "merchant_id": row["merchant_id"],
        "name": row["name"],
        "earn_rate_points_per_yuan": str(row["earn_rate_points_per_yuan"].normalize()),
        "issue_price_fen_per_point": str(row["issue_price_fen_per_point"].normalize()),
        "redeem_value_fen_per_point": str(row["redeem_value_fen_per_point"].normalize()),
        "status": row["status"],
        "terminals": row["terminals"],
        "points_issued": int(row["points_issued"] or 0),
        "points_redeemed": int(row["points_redeemed"] or 0),
    }


async def list_merchants(con: asyncpg.Connection) -> list[dict[str, Any]]:
    return [_merchant(r) for r in await con.fetch(_MERCHANTS + " ORDER BY m.merchant_id")]
