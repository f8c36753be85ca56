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
3. **clearing** (``clearing``): from D's postings alone, each merchant's points issued and
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
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import structlog

from . import clearing

log = structlog.get_logger("pointswitch.ledger.days")

_DAY_LOCK = 1886350433  # the business-date lock of business_date_now() ('pday')
_CLOSER_LOCK = 1886350435  # one closer at a time, across processes


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
        if clearing_dir is not None and not clearing.csv_path(clearing_dir, target).exists():
            report["file"] = str(clearing.write_csv(clearing_dir, report))
        return Closed(report, changed=False)
    _check_closable(cal, target, await _previous_state(pool, cal, target))
    clock = clearing.Stopwatch()
    if state is None:
        await _cut_off(pool, target, forced=target >= cal.open_day, lock_timeout_ms=lock_timeout_ms,
                       max_attempts=max_attempts)
    clock.lap("cut_off")
    expired = await expirer.expire_due(target)
    clock.lap("expiry")
    report = await clearing.clear(pool, target, by=by, expired=expired, clock=clock)
    if clearing_dir is not None:
        report["file"] = str(clearing.write_csv(clearing_dir, report))
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


async def day_report(pool: asyncpg.Pool, day: date) -> dict[str, Any] | None:
    """The stored report of a day (None when the day was never cut off)."""
    async with pool.acquire() as con:
        return await clearing.stored_report(con, day)


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
        check = await con.fetchrow(clearing.CHECKSUM, row["business_date"], timeout=clearing.DAY_QUERY_TIMEOUT_S)
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


