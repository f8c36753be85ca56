"""Clearing between merchants (清算): a closed day's positions, from its journal alone.

Per merchant, points issued and redeemed that day (net of voids, refunds and
reversals), the fee it owes for issued points and the value it is owed for
redeemed ones; per upstream host, the cash it paid to bank cards or insurers;
the network's own position, which makes the day sum to zero by construction;
the points outstanding at the end of the day; a checksum of the day's postings.
Stored with the day (``business_days``, ``clearing_positions``) in the
transaction that marks it closed, and written as a CSV file.

``days`` decides when a day is cleared; this module says what clearing is.
"""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from time import monotonic as time_monotonic
from typing import Any

import asyncpg

from . import audit

# A close reads a whole day's journal: minutes for tens of millions of postings,
# far beyond the pool's per-command timeout, which stays for everything else.
DAY_QUERY_TIMEOUT_S = 1800.0


# The columns of the clearing file, in order (docs/business-day.md describes each).
CSV_COLUMNS = (
    "business_date", "party", "kind", "points_issued", "points_redeemed", "issue_price_fen_per_point",
    "redeem_value_fen_per_point", "issue_fee_fen", "redeem_value_fen", "paid_out_fen", "net_fen",
)

# Upstream parties by the operator account their payouts go to.
_UPSTREAM_PARTIES = {"cash_out": "bank", "insurance": "insurer"}



_FLOWS = """
SELECT a.kind, CASE WHEN a.kind = 'card' THEN '' ELSE a.owner END AS owner,
       sum(f.inflow)::bigint AS inflow, sum(f.outflow)::bigint AS outflow
FROM (SELECT credit_account_id AS account_id, amount_points AS inflow, 0 AS outflow
      FROM postings WHERE business_date = $1
      UNION ALL
      SELECT debit_account_id, 0, amount_points FROM postings WHERE business_date = $1) f
JOIN accounts a USING (account_id)
GROUP BY 1, 2
"""

# Cash through the upstream hosts: a payout to the cash_out / insurance account
# paid the request's amount; a reversal out of it took the amount back.
_PAID_OUT = """
SELECT a.owner, sum(CASE WHEN p.credit_account_id = a.account_id THEN r.amount_fen ELSE -r.amount_fen END)::bigint
       AS fen
FROM postings p
JOIN requests r USING (request_id)
JOIN accounts a ON a.account_id IN (p.debit_account_id, p.credit_account_id)
WHERE p.business_date = $1 AND a.kind = 'operator' AND a.owner IN ('cash_out', 'insurance')
GROUP BY a.owner
"""

# Order-independent: any posting added, removed or changed changes it.
CHECKSUM = """
SELECT count(*) AS n, coalesce(sum(amount_points), 0) AS points,
       coalesce(sum(hashtextextended(concat_ws(':', posting_id, request_id, reason, debit_account_id,
                                               credit_account_id, amount_points), 0)::numeric), 0) AS hash
FROM postings WHERE business_date = $1
"""


def _fen(points: int, rate: Decimal) -> int:
    return int((Decimal(points) * rate).to_integral_value(ROUND_HALF_UP))


class Stopwatch:
    """How long each step of a close took (milliseconds), kept in the day's report."""

    def __init__(self) -> None:
        self.laps: dict[str, int] = {}
        self._last = time_monotonic()

    def lap(self, name: str) -> None:
        now = time_monotonic()
        self.laps[name] = round((now - self._last) * 1000)
        self._last = now


async def clear(pool: asyncpg.Pool, day: date, *, by: str | None, expired: dict[str, int],
                 clock: Stopwatch) -> dict[str, Any]:
    async with pool.acquire() as con, con.transaction():
        state = await con.fetchval("SELECT state FROM business_days WHERE business_date = $1 FOR UPDATE", day)
        if state == "closed":  # closed meanwhile by another process
            report = await stored_report(con, day)
            assert report is not None
            return report
        rows = await con.fetch(_FLOWS, day, timeout=DAY_QUERY_TIMEOUT_S)
        flows = {(r["kind"], r["owner"]): (r["inflow"], r["outflow"]) for r in rows}
        paid = {r["owner"]: r["fen"] for r in await con.fetch(_PAID_OUT, day, timeout=DAY_QUERY_TIMEOUT_S)}
        merchants = await con.fetch(
            "SELECT merchant_id, issue_price_fen_per_point AS issue_price, redeem_value_fen_per_point AS redeem_value"
            " FROM merchants ORDER BY merchant_id")
        positions: list[dict[str, Any]] = []
        for m in merchants:
            issued_in, issued_out = flows.get(("merchant_issued", m["merchant_id"]), (0, 0))
            redeemed_in, redeemed_out = flows.get(("merchant_redeemed", m["merchant_id"]), (0, 0))
            issued, redeemed = issued_out - issued_in, redeemed_in - redeemed_out
            fee, value = _fen(issued, m["issue_price"]), _fen(redeemed, m["redeem_value"])
            positions.append({
                "party": m["merchant_id"], "kind": "merchant", "points_issued": issued, "points_redeemed": redeemed,
                "issue_price_fen_per_point": str(m["issue_price"]),
                "redeem_value_fen_per_point": str(m["redeem_value"]),
                "issue_fee_fen": fee, "redeem_value_fen": value, "paid_out_fen": 0, "net_fen": value - fee,
            })
        for account, party in _UPSTREAM_PARTIES.items():
            points_in, points_out = flows.get(("operator", account), (0, 0))
            fen = paid.get(account, 0)
            positions.append({
                "party": party, "kind": "upstream", "points_issued": 0, "points_redeemed": points_in - points_out,
                "issue_price_fen_per_point": None, "redeem_value_fen_per_point": None,
                "issue_fee_fen": 0, "redeem_value_fen": 0, "paid_out_fen": fen, "net_fen": fen,
            })
        positions.append({
            "party": "network", "kind": "network", "points_issued": 0, "points_redeemed": 0,
            "issue_price_fen_per_point": None, "redeem_value_fen_per_point": None, "issue_fee_fen": 0,
            "redeem_value_fen": 0, "paid_out_fen": 0, "net_fen": -sum(p["net_fen"] for p in positions),
        })
        expired_in, expired_out = flows.get(("operator", "expired"), (0, 0))
        card_in, card_out = flows.get(("card", ""), (0, 0))
        outstanding = await _outstanding(con, day, card_in - card_out)
        check = await con.fetchrow(CHECKSUM, day, timeout=DAY_QUERY_TIMEOUT_S)
        checksum = f"{check['n']}:{check['points']}:{check['hash']}"
        report = {
            "business_date": day.isoformat(), "state": "closed",
            "positions": positions, "sum_net_fen": sum(p["net_fen"] for p in positions),
            "points_issued": sum(p["points_issued"] for p in positions),
            "points_redeemed": sum(p["points_redeemed"] for p in positions if p["kind"] == "merchant"),
            "points_paid_out": sum(p["points_redeemed"] for p in positions if p["kind"] == "upstream"),
            "points_expired": expired_in - expired_out, "cards_expired": expired.get("cards", 0),
            "points_outstanding": outstanding, "postings": check["n"], "checksum": checksum,
        }
        assert report["sum_net_fen"] == 0, "a day's positions sum to zero by construction"
        clock.lap("clearing")
        report["timings_ms"] = clock.laps
        for p in positions:
            await con.execute(
                "INSERT INTO clearing_positions (business_date, party, kind, points_issued, points_redeemed,"
                " issue_price_fen_per_point, redeem_value_fen_per_point, issue_fee_fen, redeem_value_fen,"
                " paid_out_fen, net_fen) VALUES ($1, $2, $3, $4, $5, $6::numeric, $7::numeric, $8, $9, $10, $11)",
                day, p["party"], p["kind"], p["points_issued"], p["points_redeemed"],
                p["issue_price_fen_per_point"], p["redeem_value_fen_per_point"], p["issue_fee_fen"],
                p["redeem_value_fen"], p["paid_out_fen"], p["net_fen"])
        await con.execute(
            "UPDATE business_days SET state = 'closed', closed_at = now(), closed_by = $2, postings_count = $3,"
            " postings_checksum = $4, points_expired = $5, points_outstanding = $6, sum_net_fen = $7, report = $8"
            " WHERE business_date = $1",
            day, by or audit.os_user(), check["n"], checksum, report["points_expired"], outstanding,
            report["sum_net_fen"], json.dumps(report))
        await audit.record(con, "day.close", day.isoformat(), {
            "postings": check["n"], "sum_net_fen": report["sum_net_fen"], "points_expired": report["points_expired"]},
            actor=by)
        stored = await stored_report(con, day)
        assert stored is not None
        return stored


async def _outstanding(con: asyncpg.Connection, day: date, card_net: int) -> int:
    """Points on cards at the end of ``day``: the day before's figure plus the day's
    net card movement (from the whole journal up to ``day`` when there is none)."""
    before = await con.fetchval(
        "SELECT points_outstanding FROM business_days WHERE business_date = $1 AND state = 'closed'",
        day - timedelta(days=1))
    if before is not None:
        return int(before) + card_net
    total = await con.fetchval(
        "SELECT coalesce(sum(CASE WHEN c.kind = 'card' THEN p.amount_points ELSE 0 END"
        "                  - CASE WHEN d.kind = 'card' THEN p.amount_points ELSE 0 END), 0)"
        " FROM postings p JOIN accounts c ON c.account_id = p.credit_account_id"
        " JOIN accounts d ON d.account_id = p.debit_account_id WHERE p.business_date <= $1", day,
        timeout=DAY_QUERY_TIMEOUT_S)
    return int(total)



async def stored_report(con: asyncpg.Connection, day: date) -> dict[str, Any] | None:
    row = await con.fetchrow(
        "SELECT state, forced, cut_off_at, closed_at, closed_by, report FROM business_days WHERE business_date = $1",
        day)
    if row is None:
        return None
    report: dict[str, Any] = json.loads(row["report"]) if row["report"] else {
        "business_date": day.isoformat(), "positions": []}
    report.update(state=row["state"], forced=row["forced"], closed_by=row["closed_by"],
                  cut_off_at=row["cut_off_at"].isoformat(timespec="seconds"),
                  closed_at=row["closed_at"].isoformat(timespec="seconds") if row["closed_at"] else None)
    return report



def csv_path(folder: Path, day: date) -> Path:
    return folder / f"clearing-{day:%Y%m%d}.csv"


def render_csv(report: dict[str, Any]) -> str:
    """The clearing file: a header, one line per party, a totals line. UTF-8, comma-separated."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in report["positions"]:
        writer.writerow([report["business_date"]] + ["" if p[c] is None else p[c] for c in CSV_COLUMNS[1:]])
    total = {c: sum(p[c] for p in report["positions"]) for c in
             ("points_issued", "points_redeemed", "issue_fee_fen", "redeem_value_fen", "paid_out_fen", "net_fen")}
    writer.writerow([report["business_date"], "TOTAL", "total", total["points_issued"], total["points_redeemed"],
                     "", "", total["issue_fee_fen"], total["redeem_value_fen"], total["paid_out_fen"],
                     total["net_fen"]])
    return out.getvalue()


def write_csv(folder: Path, report: dict[str, Any]) -> Path:
    """Write the day's clearing file atomically (a reader never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = csv_path(folder, date.fromisoformat(report["business_date"]))
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(render_csv(report), encoding="utf-8")
    os.replace(tmp, path)
    return path
