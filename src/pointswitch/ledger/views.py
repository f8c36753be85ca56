"""Read-only queries for the operator console's screens (no change, no audit).

Card numbers appear only masked (``pan_display``); every query is bounded (a
time window, one batch, a row limit) so a screen never reads a whole table.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg

from . import days


async def traffic(con: asyncpg.Connection, *, minutes: int = 60) -> dict[str, Any]:
    """Requests of the last ``minutes`` minutes, per minute and status (the ledger's
    reason for its answer), oldest minute first; and the totals per status."""
    rows = await con.fetch(
        "SELECT date_trunc('minute', created_at) AS minute, status, count(*) AS n FROM requests"
        " WHERE created_at > now() - make_interval(mins => $1) GROUP BY 1, 2 ORDER BY 1", minutes)
    now = await con.fetchval("SELECT date_trunc('minute', now())")
    slots = [now - timedelta(minutes=minutes - 1 - i) for i in range(minutes)]
    per_minute = {slot: 0 for slot in slots}
    by_status: dict[str, int] = {}
    for r in rows:
        if r["minute"] in per_minute:
            per_minute[r["minute"]] += r["n"]
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["n"]
    return {
        "minutes": [{"at": slot.isoformat(timespec="minutes"), "requests": n} for slot, n in per_minute.items()],
        "by_status": dict(sorted(by_status.items(), key=lambda kv: -kv[1])),
        "total": sum(by_status.values()),
    }


async def merchant_days(con: asyncpg.Connection, merchant_id: str, *, days_back: int = 30) -> list[dict[str, Any]]:
    """Points issued and redeemed at a merchant on each of the last ``days_back``
    business days, oldest first: closed days from their clearing positions, the open
    day live from its postings, a day not closed (or without traffic) as zero."""
    cal = await days.calendar(con)
    since = cal.open_day - timedelta(days=days_back - 1)
    rows = await con.fetch(
        "SELECT business_date, points_issued, points_redeemed FROM clearing_positions"
        " WHERE party = $1 AND kind = 'merchant' AND business_date >= $2", merchant_id, since)
    closed = {r["business_date"]: (r["points_issued"], r["points_redeemed"]) for r in rows}
    live = await con.fetchrow(_OPEN_DAY_FLOWS, merchant_id, cal.open_day)
    closed.setdefault(cal.open_day, (int(live["issued"]), int(live["redeemed"])))
    out = []
    for n in range(days_back):
        day = since + timedelta(days=n)
        issued, redeemed = closed.get(day, (0, 0))
        out.append({"business_date": day.isoformat(), "points_issued": issued, "points_redeemed": redeemed})
    return out


# A merchant's points issued and redeemed on one (the open) business day, from its postings.
_OPEN_DAY_FLOWS = (
    "SELECT coalesce(sum(CASE WHEN p.debit_account_id = m.issued_account_id THEN p.amount_points"
    "                         WHEN p.credit_account_id = m.issued_account_id THEN -p.amount_points END), 0)"
    "         AS issued,"
    " coalesce(sum(CASE WHEN p.credit_account_id = m.redeemed_account_id THEN p.amount_points"
    "                   WHEN p.debit_account_id = m.redeemed_account_id THEN -p.amount_points END), 0)"
    "         AS redeemed"
    " FROM merchants m JOIN postings p ON p.business_date = $2"
    " AND (m.issued_account_id IN (p.debit_account_id, p.credit_account_id)"
    "      OR m.redeemed_account_id IN (p.debit_account_id, p.credit_account_id))"
    " WHERE m.merchant_id = $1")


async def clearing_positions(con: asyncpg.Connection, party: str, *, limit: int = 30) -> list[dict[str, Any]]:
    """A party's clearing positions, newest day first."""
    rows = await con.fetch(
        "SELECT business_date, points_issued, points_redeemed, issue_fee_fen, redeem_value_fen, paid_out_fen,"
        " net_fen FROM clearing_positions WHERE party = $1 ORDER BY business_date DESC LIMIT $2", party, limit)
    return [{**dict(r), "business_date": r["business_date"].isoformat()} for r in rows]


async def terminal_requests(con: asyncpg.Connection, terminal_id: str, batch: int, *, limit: int = 100
                            ) -> list[dict[str, Any]]:
    """A terminal's requests in ``batch`` (its open one, usually), newest first, cards masked."""
    rows = await con.fetch(
        "SELECT r.created_at, r.operation, r.state, r.status, r.trace, r.rrn, r.amount_fen, r.points,"
        " r.business_date, c.pan_display FROM requests r LEFT JOIN cards c USING (card_index)"
        " WHERE r.terminal_id = $1 AND r.batch = $2 ORDER BY r.request_id DESC LIMIT $3",
        terminal_id, batch, limit)
    return [{**{k: r[k] for k in ("operation", "state", "status", "trace", "rrn", "amount_fen", "points")},
             "at": r["created_at"].isoformat(timespec="seconds"), "card": r["pan_display"],
             "business_date": r["business_date"].isoformat() if r["business_date"] else None} for r in rows]


async def find_card(con: asyncpg.Connection, card_index: str) -> bool:
    return bool(await con.fetchval("SELECT 1 FROM cards WHERE card_index = $1", card_index))

