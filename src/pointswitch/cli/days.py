"""``pointswitch admin day`` and ``admin clearing``: the business day, for operators.

    admin day list                       the open day, its cut-off, the days closed
    admin day close [DATE]               close DATE; no DATE: cut the open day off now
    admin day verify                     closed days unchanged since they closed
    admin clearing show DATE             the day's clearing positions (--csv: the file)

The work is in ``ledger.days``; serve closes each day by itself as well.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from typing import Any

from . import common
from .admin import admin_cmd


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def cmd_day(args: argparse.Namespace) -> int:
    from ..ledger import days

    if args.action == "close":
        async def close(ledger: Any, cfg: Any) -> Any:
            await _set_calendar(ledger, cfg)
            return await days.close_day(ledger.pool, ledger, args.date, clearing_dir=cfg.clearing_dir,
                                        lock_timeout_ms=cfg.day.cutoff_lock_timeout_ms,
                                        max_attempts=cfg.day.cutoff_attempts)

        closed = common.with_ledger(args, close, (days.DayError,))
        report = dict(closed.report, changed=closed.changed)
        common.print_result(report, args.json, _closed_text)
        return 0
    if args.action == "verify":
        async def verify(ledger: Any, _cfg: Any) -> Any:
            async with ledger.pool.acquire() as con:
                return await days.verify_days(con)

        problems = common.with_ledger(args, verify)
        common.print_result({"problems": problems}, args.json,
                            lambda r: "\n".join(r["problems"]) or "every closed day is unchanged")
        return 1 if problems else 0

    async def listing(ledger: Any, _cfg: Any) -> Any:
        return await days.list_days(ledger.pool, limit=args.limit)

    common.print_result(common.with_ledger(args, listing), args.json, _list_text)
    return 0


async def _set_calendar(ledger: Any, cfg: Any) -> None:
    from ..ledger import days

    async with ledger.pool.acquire() as con:
        await days.set_calendar(con, cfg.day.cutoff_time(), cfg.day.time_zone)


def cmd_clearing(args: argparse.Namespace) -> int:
    from ..ledger import clearing, days

    async def show(ledger: Any, _cfg: Any) -> Any:
        return await days.day_report(ledger.pool, args.date)

    report = common.with_ledger(args, show)
    if report is None or report.get("state") != "closed":
        sys.exit(f"pointswitch: business day {args.date} is not closed: no clearing yet")
    if args.csv:
        sys.stdout.write(clearing.render_csv(report))
        return 0
    common.print_result(report, args.json, clearing_text)
    return 0


def clearing_text(r: dict[str, Any]) -> str:
    """The clearing report as an operator reads it (the demo prints it too)."""
    lines = [f"clearing of business day {r['business_date']}" + (" (forced cut-off)" if r.get("forced") else ""),
             f"  {'party':<16} {'issued':>8} {'redeemed':>9} {'fee owed':>11} {'value owed':>11}"
             f" {'paid out':>11} {'net (fen)':>11}"]
    for p in r["positions"]:
        lines.append(f"  {p['party']:<16} {p['points_issued']:>8} {p['points_redeemed']:>9}"
                     f" {p['issue_fee_fen']:>11} {p['redeem_value_fen']:>11} {p['paid_out_fen']:>11}"
                     f" {p['net_fen']:>+11}")
    balanced = "sums to zero" if r["sum_net_fen"] == 0 else "DOES NOT SUM TO ZERO"
    lines.append(f"  {'sum':<16} {'':>8} {'':>9} {'':>11} {'':>11} {'':>11} {r['sum_net_fen']:>+11}  {balanced}")
    lines.append(f"  points expired {r['points_expired']} (breakage), outstanding at the end of the day"
                 f" {r['points_outstanding']}; {r['postings']} postings, checksum {r['checksum']}")
    if r.get("file"):
        lines.append(f"  clearing file: {r['file']}")
    return "\n".join(lines)


def _closed_text(r: dict[str, Any]) -> str:
    head = (f"business day {r['business_date']} closed" if r["changed"]
            else f"business day {r['business_date']} was already closed (at {r['closed_at']}): nothing changed")
    return head + "\n" + clearing_text(r)


def _list_text(r: dict[str, Any]) -> str:
    lines = [f"open business day {r['open_day']} (ends {r['open_day_ends_at']}; cut-off {r['cutoff']}"
             f" {r['time_zone']})"]
    for d in r["days"]:
        forced = " forced" if d["forced"] else ""
        lines.append(f"  {d['business_date']}  {d['state']:<8}{forced:<7} postings {d['postings_count'] or 0:>8}"
                     f"  expired {d['points_expired'] or 0:>7}  outstanding {d['points_outstanding'] or 0:>10}"
                     f"  closed {d['closed_at'] or '-'} by {d['closed_by'] or '-'}")
    return "\n".join(lines)


def add_parsers(asub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``admin day ...`` and ``admin clearing ...``, under the admin sub-parsers."""
    d = asub.add_parser("day", help="the business day: list, close, verify")
    dsub = d.add_subparsers(dest="action", required=True)
    sp = admin_cmd(dsub, "list", "the open business day and the newest days closed", cmd_day)
    sp.add_argument("--limit", type=int, default=30, help="at most this many days (default 30)")
    sp = admin_cmd(dsub, "close", "close a business day: cut-off, expiry, clearing, file", cmd_day)
    sp.add_argument("date", nargs="?", type=_date,
                    help="YYYY-MM-DD; default: the open day, cut off now (the next day opens at once)")
    admin_cmd(dsub, "verify", "check that no closed day changed since it closed", cmd_day)

    c = asub.add_parser("clearing", help="clearing between merchants, per business day")
    csub = c.add_subparsers(dest="action", required=True)
    sp = admin_cmd(csub, "show", "a closed day's clearing positions", cmd_clearing)
    sp.add_argument("date", type=_date, help="YYYY-MM-DD")
    sp.add_argument("--csv", action="store_true", help="print the clearing file instead")
