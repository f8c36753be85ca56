"""``pointswitch admin reversals``: reversals owed to upstream hosts, for operators.

    admin reversals list [--state S] [--limit N]
    admin reversals retry ID                       an expired (or pending) one is due now
    admin reversals resolve ID --outcome reversed|kept   settled with the host out of band

The SQL is in ``ledger.saf`` (``ReversalQueue``); ``resolve --outcome reversed``
gives points back through the same code as the host's acknowledgement.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from . import common
from .admin import admin_cmd

STATES = ("pending", "expired", "acknowledged", "resolved")


def _with_queue(args: argparse.Namespace, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``fn(queue)`` against the configured database: the queue's ledger moves
    points in transactions of its own."""
    from ..ledger.saf import ReversalError, ReversalQueue

    return common.with_ledger(args, lambda ledger, _cfg: fn(ReversalQueue(ledger)), (ReversalError,))


def cmd_reversals(args: argparse.Namespace) -> int:
    if args.action == "list":
        rows = _with_queue(args, lambda q: q.list_reversals(state=args.state, limit=args.limit))
        common.print_result(rows, args.json, _list_text)
    elif args.action == "retry":
        result = _with_queue(args, lambda q: q.retry_now(args.reversal_id))
        common.print_result(result, args.json, lambda r: f"reversal {r['reversal_id']} ({r['connector']}) was"
                                                         f" {r['was']}: due now")
    else:
        result = _with_queue(args, lambda q: q.resolve(args.reversal_id, args.outcome))
        common.print_result(result, args.json, _resolve_text)
    return 0


def _list_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no reversals"
    lines = [f"{'id':>6}  {'connector':<10} {'reason':<17} {'state':<17} {'tries':>5} {'age':>9}  {'rc':<3}"
             f" {'upstream 37':<12} {'terminal':<8} {'trace':>6} {'fen':>8}  last error"]
    for r in rows:
        state = r["state"] + (f":{r['resolved_outcome']}" if r["resolved_outcome"] else "")
        lines.append(
            f"{r['reversal_id']:>6}  {r['connector']:<10} {r['reason']:<17} {state:<17} {r['attempts']:>5}"
            f" {_age(r['age_s']):>9}  {r['upstream_rc'] or '-':<3} {r['upstream_rrn'] or '-':<12}"
            f" {r['terminal_id']:<8} {r['trace']:>6} {r['amount_fen']:>8}  {r['last_error'] or ''}"
        )
    return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _resolve_text(r: dict[str, Any]) -> str:
    text = (f"reversal {r['reversal_id']} ({r['connector']}, {r['reason']}) resolved: {r['outcome']},"
            f" {r['points_back']} points back to the card")
    return text + (f"\n  note: {r['note']}" if r.get("note") else "")


def add_parsers(asub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``admin reversals ...``, under the admin sub-parsers ``cli.admin.add_parsers`` returns."""
    r = asub.add_parser("reversals", help="reversals owed to upstream hosts: list, retry, resolve")
    rsub = r.add_subparsers(dest="action", required=True)
    sp = admin_cmd(rsub, "list", "reversals, newest first (no card numbers)", cmd_reversals)
    sp.add_argument("--state", choices=STATES, help="only reversals in this state")
    sp.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    sp = admin_cmd(rsub, "retry", "make an expired or pending reversal due now", cmd_reversals)
    sp.add_argument("reversal_id", type=int)
    sp = admin_cmd(rsub, "resolve", "close a reversal settled with the host out of band", cmd_reversals)
    sp.add_argument("reversal_id", type=int)
    sp.add_argument("--outcome", required=True, choices=["reversed", "kept"],
                    help="reversed: the host undid the credit (points back to the card);"
                         " kept: the host kept it (points stay paid out)")
