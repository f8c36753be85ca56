"""The business day: cut-off, close, and the clearing between merchants.

A request and its postings belong to the business date ``business_date_now()``
gives them (migration 0009): the clock's date in the network's time zone, the
next one once past the cut-off time, never a day already cut off.

Closing day D, in steps that each survive a crash (a rerun continues):

1. **cut-off**: D's successor opens; no posting joins D any more. One short
   transaction takes the business-date lock exclusively, so it waits for the
   posting transactions in flight (those that asked for the date before it) and
   the ones after it see the new ``cut_through``. The lock is asked for with a
   short ``lock_timeout`` and retried, so a cut-off never holds up the network
   for longer than that, nor joins a lock cycle.
2. **expiry**: lots due by D move to the operator's ``expired`` account by
   ordinary postings dated D (``Ledger.expire_due``), in short transactions.
3. **clearing**: from D's postings alone, each merchant's points issued and
   redeemed (net of voids, refunds and reversals), the fee it owes for issued
   points and the value it is owed for redeemed ones; the cash the upstream hosts
   paid to bank cards and insurers; the network's own position, which makes the
   day sum to zero by construction; the points outstanding at the end of D. The
   report, the positions and a checksum of D's postings are stored in the same
   transaction that marks D closed. A closed day never changes: ``verify_days``
   recomputes every checksum.
4. **file**: the clearing CSV, written from the stored report (again if lost).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from time import monotonic as time_monotonic
from typing import Any, Protocol

import asyncpg
import structlog

from . import audit

log = structlog.get_logger("pointswitch.ledger.days")

# A close reads a whole day's journal: minutes for tens of millions of postings,
# far beyond the pool's per-command timeout, which stays for everything else.
DAY_QUERY_TIMEOUT_S = 1800.0

_DAY_LOCK = 1886350433  # the business-date lock of business_date_now() ('pday')
_CLOSER_LOCK = 1886350435  # one closer at a time, across processes

# The columns of the clearing file, in order (docs/operator.md describes each).
CSV_COLUMNS = (
    "business_date", "party", "kind", "points_issued", "points_redeemed", "issue_price_fen_per_point",
    "redeem_value_fen_per_point", "issue_fee_fen", "redeem_value_fen", "paid_out_fen", "net_fen",
)

# Upstream parties by the operator account their payouts go to.
_UPSTREAM_PARTIES = {"cash_out": "bank", "insurance": "insurer"}


class DayError(Exception):
    """A day that cannot be closed (yet), and why, in one line for the operator."""


class Expirer(Protocol):
    async def expire_due(self, day: date) -> dict[str, int]: ...


@dataclass(frozen=True)
class Calendar:
    cutoff: time
    time_zone: str
    first_day: date
    cut_through: date | None
    open_day: date  # the business date a posting made now gets

    def ends_at(self, day: date) -> datetime:
        """The instant business day ``day`` ends (its cut-off), timezone-aware."""
        from zoneinfo import ZoneInfo

        tz = ZoneInfo(self.time_zone)
        if self.cutoff == time(0, 0):
            return datetime.combine(day + timedelta(days=1), time(0, 0), tz)
        return datetime.combine(day, self.cutoff, tz)


async def set_calendar(con: asyncpg.Connection, cutoff: time, time_zone: str) -> None:
    """Make the database's cut-off time and time zone those of the settings."""
    await con.execute("UPDATE business_calendar SET cutoff = $1, time_zone = $2"
                      " WHERE (cutoff, time_zone) IS DISTINCT FROM ($1, $2)", cutoff, time_zone)


async def calendar(con: asyncpg.Connection) -> Calendar:
    row = await con.fetchrow(
        "SELECT cutoff, time_zone, first_day, cut_through,"
        " greatest(business_date_at(now(), cutoff, time_zone), cut_through + 1) AS open_day"
        " FROM business_calendar")
    return Calendar(row["cutoff"], row["time_zone"], row["first_day"], row["cut_through"], row["open_day"])


@dataclass(frozen=True)
class Closed:
    report: dict[str, Any]
    changed: bool  # False: the day was closed already, nothing was done


async def close_day(pool: asyncpg.Pool, expirer: Expirer, day: date | None = None, *, by: str | None = None,
                    clearing_dir: Path | None = None, lock_timeout_ms: int = 250, max_attempts: int = 400
                    ) -> Closed:
    """Close ``day`` (default: the open day, cut off at once). Refused, with the
    reason, when the day has not begun or the day before it is not closed; a day
    already closed is left as it is and its report returned."""
    async with pool.acquire() as closer:  # one closer at a time; held for the whole close
        if not await closer.fetchval("SELECT pg_try_advisory_lock($1)", _CLOSER_LOCK):
            raise DayError("another close is under way; try again when it has finished")
        try:
            return await _close(pool, expirer, day, by=by, clearing_dir=clearing_dir,
                                lock_timeout_ms=lock_timeout_ms, max_attempts=max_attempts)
        finally:
            await closer.execute("SELECT pg_advisory_unlock($1)", _CLOSER_LOCK)


async def _close(pool: asyncpg.Pool, expirer: Expirer, day: date | None, *, by: str | None, clearing_dir: Path | None,
                 lock_timeout_ms: int, max_attempts: int) -> Closed:
    async with pool.acquire() as con:
        cal = await calendar(con)
        target = day or cal.open_day
        state = await con.fetchval("SELECT state FROM business_days WHERE business_date = $1", target)
    if state == "closed":
        report = await day_report(pool, target)
        assert report is not None
        if clearing_dir is not None and not _csv_path(clearing_dir, target).exists():
            report["file"] = str(write_csv(clearing_dir, report))
        return Closed(report, changed=False)
    _check_closable(cal, target, await _previous_state(pool, cal, target))
    clock = _Stopwatch()
    if state is None:
        await _cut_off(pool, target, forced=target >= cal.open_day, lock_timeout_ms=lock_timeout_ms,
                       max_attempts=max_attempts)
    clock.lap("cut_off")
    expired = await expirer.expire_due(target)
    clock.lap("expiry")
    report = await _clear(pool, target, by=by, expired=expired, clock=clock)
    if clearing_dir is not None:
        report["file"] = str(write_csv(clearing_dir, report))
    log.info("business day closed", business_date=target.isoformat(), postings=report["postings"],
             sum_net_fen=report["sum_net_fen"], points_expired=report["points_expired"], by=by)
    return Closed(report, changed=True)


async def _previous_state(pool: asyncpg.Pool, cal: Calendar, day: date) -> str | None:
    if day <= cal.first_day:
        return "closed"  # nothing before the network's first day
    async with pool.acquire() as con:
        state: str | None = await con.fetchval(
            "SELECT state FROM business_days WHERE business_date = $1", day - timedelta(days=1))
        return state


def _check_closable(cal: Calendar, day: date, previous: str | None) -> None:
    if day > cal.open_day:
        raise DayError(f"business day {day} has not begun (the open day is {cal.open_day})")
    if day < cal.first_day:
        raise DayError(f"business day {day} is before the network's first day ({cal.first_day})")
    if previous != "closed":
        raise DayError(f"close business day {day - timedelta(days=1)} first (days close in order)")


async def _cut_off(pool: asyncpg.Pool, day: date, *, forced: bool, lock_timeout_ms: int, max_attempts: int) -> None:
    """No posting joins ``day`` after this: wait for those in flight, then move the
    cut-through. The exclusive lock is asked for briefly and retried, so that the
    postings queued behind it wait at most ``lock_timeout_ms`` at a time."""
    for attempt in range(1, max_attempts + 1):
        try:
            async with pool.acquire() as con, con.transaction():
                await con.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                await con.execute("SELECT pg_advisory_xact_lock($1)", _DAY_LOCK)
                await con.execute("SET LOCAL lock_timeout = 0")
                await con.execute(
                    "UPDATE business_calendar SET cut_through = greatest(cut_through, $1)", day)
                await con.execute(
                    "INSERT INTO business_days (business_date, state, forced) VALUES ($1, 'cut_off', $2)"
                    " ON CONFLICT (business_date) DO NOTHING", day, forced)
            log.info("business day cut off", business_date=day.isoformat(), forced=forced, attempts=attempt)
            return
        except asyncpg.LockNotAvailableError:
            await asyncio.sleep(min(0.05 * attempt, 1.0))
    raise DayError(f"could not cut business day {day} off: postings kept the lock ({max_attempts} attempts)")


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
_CHECKSUM = """
SELECT count(*) AS n, coalesce(sum(amount_points), 0) AS points,
       coalesce(sum(hashtextextended(concat_ws(':', posting_id, request_id, reason, debit_account_id,
                                               credit_account_id, amount_points), 0)::numeric), 0) AS hash
FROM postings WHERE business_date = $1
"""


def _fen(points: int, rate: Decimal) -> int:
    return int((Decimal(points) * rate).to_integral_value(ROUND_HALF_UP))


class _Stopwatch:
    """How long each step of a close took (milliseconds), kept in the day's report."""

    def __init__(self) -> None:
        self.laps: dict[str, int] = {}
        self._last = time_monotonic()

    def lap(self, name: str) -> None:
        now = time_monotonic()
        self.laps[name] = round((now - self._last) * 1000)
        self._last = now


async def _clear(pool: asyncpg.Pool, day: date, *, by: str | None, expired: dict[str, int],
                 clock: _Stopwatch) -> dict[str, Any]:
    async with pool.acquire() as con, con.transaction():
        state = await con.fetchval("SELECT state FROM business_days WHERE business_date = $1 FOR UPDATE", day)
        if state == "closed":  # closed meanwhile by another process
            report = await _stored_report(con, day)
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
        check = await con.fetchrow(_CHECKSUM, day, timeout=DAY_QUERY_TIMEOUT_S)
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
        stored = await _stored_report(con, day)
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


async def _stored_report(con: asyncpg.Connection, day: date) -> dict[str, Any] | None:
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


async def day_report(pool: asyncpg.Pool, day: date) -> dict[str, Any] | None:
    """The stored report of a day (None when the day was never cut off)."""
    async with pool.acquire() as con:
        return await _stored_report(con, day)


async def list_days(pool: asyncpg.Pool, *, limit: int = 30) -> dict[str, Any]:
    """The open day and the newest days cut off or closed."""
    async with pool.acquire() as con:
        cal = await calendar(con)
        rows = await con.fetch(
            "SELECT business_date, state, forced, cut_off_at, closed_at, closed_by, postings_count,"
            " points_expired, points_outstanding, sum_net_fen FROM business_days"
            " ORDER BY business_date DESC LIMIT $1", limit)
    return {
        "open_day": cal.open_day.isoformat(), "cutoff": cal.cutoff.strftime("%H:%M"), "time_zone": cal.time_zone,
        "open_day_ends_at": cal.ends_at(cal.open_day).isoformat(timespec="minutes"),
        "days": [{**{k: r[k] for k in ("state", "forced", "closed_by", "postings_count", "points_expired",
                                        "points_outstanding", "sum_net_fen")},
                  "business_date": r["business_date"].isoformat(),
                  "cut_off_at": r["cut_off_at"].isoformat(timespec="seconds"),
                  "closed_at": r["closed_at"].isoformat(timespec="seconds") if r["closed_at"] else None}
                 for r in rows],
    }


async def verify_days(con: asyncpg.Connection) -> list[str]:
    """Closed days whose postings changed since they closed (empty: none)."""
    problems = []
    for row in await con.fetch("SELECT business_date, postings_checksum FROM business_days WHERE state = 'closed'"):
        check = await con.fetchrow(_CHECKSUM, row["business_date"], timeout=DAY_QUERY_TIMEOUT_S)
        now = f"{check['n']}:{check['points']}:{check['hash']}"
        if now != row["postings_checksum"]:
            problems.append(f"closed business day {row['business_date']} changed: {row['postings_checksum']} -> {now}")
    return problems


async def days_due(pool: asyncpg.Pool, grace_s: float) -> list[date]:
    """Days whose cut-off passed more than ``grace_s`` ago and are not closed yet, oldest first."""
    async with pool.acquire() as con:
        cal = await calendar(con)
        last = await con.fetchval("SELECT max(business_date) FROM business_days WHERE state = 'closed'")
        now = await con.fetchval("SELECT now()")
    day = last + timedelta(days=1) if last else cal.first_day
    due = []
    while day < cal.open_day and cal.ends_at(day) + timedelta(seconds=grace_s) <= now:
        due.append(day)
        day += timedelta(days=1)
    return due


def _csv_path(folder: Path, day: date) -> Path:
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
    path = _csv_path(folder, date.fromisoformat(report["business_date"]))
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(render_csv(report), encoding="utf-8")
    os.replace(tmp, path)
    return path
