"""``pointswitch admin batch``: terminals' batch settlements and their reconciliation.

    admin batch list [--terminal T] [--date D] [--json]
    admin batch show T BATCH [--json]

The queries are in ``ledger.batches``; card numbers are shown masked.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from typing import Any

from . import common
from .admin import admin_cmd


def cmd_batch(args: argparse.Namespace) -> int:
    from ..ledger import batches

    if args.action == "list":
        rows = common.with_db(args, lambda c, v: batches.list_settlements(
            c, terminal_id=args.terminal, business_date=args.date, limit=args.limit))
        common.print_result(rows, args.json, _list_text)
        return 0
    shown = common.with_db(args, lambda c, v: batches.show_settlement(c, args.terminal_id, args.batch))
    if shown is None:
        sys.exit(f"pointswitch: terminal {args.terminal_id} has no settlement of batch {args.batch}")
    common.print_result(shown, args.json, _show_text)
    return 0


def _totals(t: dict[str, int]) -> str:
    return (f"debit {t['debit_count']} / {t['debit_amount_fen']} fen, "
            f"credit {t['credit_count']} / {t['credit_amount_fen']} fen")


def _list_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no settlements"
    lines = [f"{'terminal':<8} {'batch':>6} {'date':<10} {'agree':<5}  terminal totals / host totals"]
    for r in rows:
        lines.append(f"{r['terminal']:<8} {r['batch']:>6} {r['business_date']:<10} {'yes' if r['agree'] else 'NO':<5}"
                     f"  {_totals(r['terminal_totals'])} / {_totals(r['host_totals'])}")
    return "\n".join(lines)


def _show_text(r: dict[str, Any]) -> str:
    up = r["upload"]
    lines = [
        f"terminal {r['terminal']} (merchant {r['merchant']}) batch {r['batch']}, settled {r['settled_at']}"
        f" on business date {r['business_date']}: {'balanced' if r['agree'] else 'NOT balanced'}",
        f"  terminal: {_totals(r['terminal_totals'])}",
        f"  host:     {_totals(r['host_totals'])}",
        f"  upload: {up['records']} records in {up['messages']} messages; "
        + (f"ended {up['ended_at']}, terminal says {up['records_sent']} sent, {up['reconciliation']}"
           if up["ended_at"] else "not ended"),
    ]
    for line in r["lines"]:
        lines.append(f"  {line['trace']:>6} {line['kind']:<15} {line['operation'] or '-':<16} {line['card'] or '-':<20}"
                     f" terminal {_fen(line['terminal_amount_fen'])}  host {_fen(line['host_amount_fen'])}")
    return "\n".join(lines)


def _fen(value: int | None) -> str:
    return "-" if value is None else f"{value} fen"


def add_parsers(asub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``admin batch ...``, under the admin sub-parsers ``cli.admin.add_parsers`` returns."""
    b = asub.add_parser("batch", help="terminals' batch settlements: list, show")
    bsub = b.add_subparsers(dest="action", required=True)
    sp = admin_cmd(bsub, "list", "settlements, newest first", cmd_batch)
    sp.add_argument("--terminal", help="only this terminal's")
    sp.add_argument("--date", type=date.fromisoformat, help="only those of this business date (YYYY-MM-DD)")
    sp.add_argument("--limit", type=int, default=200, help="at most this many (default 200)")
    sp = admin_cmd(bsub, "show", "one settlement: totals and the upload's reconciliation lines", cmd_batch)
    sp.add_argument("terminal_id")
    sp.add_argument("batch", type=int)
