"""``pointswitch admin``: merchants, terminals, cards, invariants, connectors, load-test data."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from ..ledger.model import TerminalProfile
from . import common
from .common import EXIT_USAGE

LOAD_PIN = "123456"  # the load cards' PIN unless --pin - gives another


def cmd_admin(args: argparse.Namespace) -> int:
    from ..ledger import admin, audit

    what, action = args.what, args.action
    # Secrets are read (from standard input) before anything else happens.
    tmk = common.secret(getattr(args, "tmk", None), "--tmk", "terminal master key (32 hex digits)")
    pin = common.secret(getattr(args, "pin", None), "--pin", "PIN")
    if what == "merchant" and action == "add":
        result = common.with_db(args, lambda c, v: admin.add_merchant(
            c, args.merchant_id, args.name, args.earn_rate, args.issue_price, args.redeem_value))
    elif what == "merchant" and action == "update":
        result = common.with_db(args, lambda c, v: admin.update_merchant(
            c, args.merchant_id, name=args.name, earn_rate=args.earn_rate, issue_price=args.issue_price,
            redeem_value=args.redeem_value, status=args.status))
    elif what == "merchant" and action == "list":
        result = common.with_db(args, lambda c, v: admin.list_merchants(c))
    elif what == "terminal" and action == "add":
        profile = TerminalProfile(args.dialect, args.mac or ("ecb" if args.dialect == "cup" else "x919"),
                                  bool(args.double_mak), bool(args.allow_single_des))
        result = common.with_db(args, lambda c, v: admin.add_terminal(
            c, v, args.terminal_id, args.merchant, args.status, tmk, profile))
    elif what == "terminal" and action == "profile":
        result = common.with_db(args, lambda c, v: admin.set_terminal_profile(
            c, args.terminal_id, dialect=args.dialect, mac=args.mac, double_mak=args.double_mak,
            single_des_allowed=args.allow_single_des))
    elif what == "terminal" and action == "rekey":
        result = common.with_db(args, lambda c, v: admin.rekey_terminal(c, v, args.terminal_id, tmk))
    elif what == "terminal" and action == "api-key":
        from ..ledger.api import issue_api_key

        result = common.with_db(args, lambda c, v: issue_api_key(c, v, args.terminal_id))
        if not args.json:
            print(f"API key {result['api_key']}")
            print("  (shown once: give it to the merchant's system now; it is stored only sealed under the master"
                  " key, and the terminal now speaks the JSON API only)")
            result = {k: v for k, v in result.items() if k != "api_key"}
    elif what == "terminal" and action == "list":
        result = common.with_db(args, lambda c, v: admin.list_terminals(c, merchant_id=args.merchant))
    elif what == "terminal" and action in ("disable", "enable"):
        status = "disabled" if action == "disable" else "active"
        result = common.with_db(args, lambda c, v: admin.set_terminal_status(c, args.terminal_id, status))
    elif what == "card" and action == "add":
        result = common.with_db(args, lambda c, v: admin.add_card(
            c, v, args.card_number, args.name, args.phone, pin, args.status))
    elif what == "card" and action in ("block", "unblock"):
        status = "blocked" if action == "block" else "active"
        result = common.with_db(args, lambda c, v: admin.set_card_status(c, v, args.card_number, status))
    elif what == "card" and action == "set-pin":
        assert pin is not None  # a required option
        result = common.with_db(args, lambda c, v: admin.set_pin(c, v, args.card_number, pin))
    elif what == "card" and action == "unlock-pin":
        result = common.with_db(args, lambda c, v: admin.unlock_pin(c, v, args.card_number))
    elif what == "card" and action == "show":
        result = common.with_db(args, lambda c, v: admin.show_card(
            c, v, args.card_number, args.postings, reveal=args.reveal))
    elif what == "check":
        problems = common.with_db(args, lambda c, v: admin.check_invariants(c))
        common.print_result({"ok": not problems, "problems": problems}, args.json,
               lambda d: "all ledger invariants hold" if d["ok"] else "\n".join(d["problems"]))
        return 0 if not problems else 1
    elif what == "seed":
        result = common.with_db(args, lambda c, v: _seed(c, v, args, tmk, pin or LOAD_PIN))
        if not args.json and (result["terminals_skipped"] or result["cards_skipped"] or not result["merchant_created"]):
            print(f"left as they are: {'the merchant, ' if not result['merchant_created'] else ''}"
                  f"{result['terminals_skipped']} terminals that exist (keys unchanged),"
                  f" {result['cards_skipped']} cards that exist (PINs unchanged)")
    elif what == "connectors":
        result = common.with_db(args, lambda c, v: admin.connectors(c))
        common.print_result(result, args.json, _connectors_text)
        return 0
    elif what == "audit":
        result = common.with_db(args, lambda c, v: audit.entries(c, since=args.since, limit=args.limit))
        common.print_result(result, args.json, _audit_text)
        return 0
    else:  # pragma: no cover - argparse prevents it
        return EXIT_USAGE
    if isinstance(result, dict) and "tmk" in result and not args.json:
        print(f"terminal master key {result['tmk']}  check value {result['tmk_check_value']}")
        print("  (shown once: load it into the terminal now; it is stored only sealed under the master key)")
        result = {k: v for k, v in result.items() if k not in ("tmk",)}
    common.print_result(result, args.json)
    return 0


def _audit_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no audit entries"
    return "\n".join(
        f"{r['at']}  {r['actor']:<10} {r['action']:<17} {r['target']:<20} {json.dumps(r['details'])}"
        f"  ({r['origin']})"
        for r in rows
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def _since(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time") from None
    return at if at.tzinfo else at.astimezone()  # a time without zone is local time


def _connectors_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no connector has reported (none configured, or the switch has not run)"
    lines = []
    for r in rows:
        st, rev = r["state"], r["state"].get("reversals", {})
        lines.append(
            f"{r['name']:<10} {st['host']}:{st['port']}  links {st['links_up']}/{st['links']}  in flight"
            f" {st['in_flight']}  sent {st['sent']}  timeouts {st['timeouts']}  late {st['late']}"
            f"  last echo {st['last_echo_ok'] or '-'}  reversals pending {rev.get('pending', 0)}"
            f" expired {rev.get('expired', 0)}  (as of {r['updated_at']})"
        )
        if st.get("last_error") and st["links_up"] < st["links"]:  # news only while a link is down
            at = f" at {st['last_error_at']}" if st.get("last_error_at") else ""
            lines.append(f"{'':<10} last error{at}: {st['last_error']}")
    return "\n".join(lines)


async def _seed(con: Any, vault: Any, args: argparse.Namespace, tmk: str | None, pin: str) -> dict[str, Any]:
    from ..ledger import admin
    from ..simulators.load import terminal_id

    return await admin.seed(
        con, vault, merchant_id=args.merchant, earn_rate=args.earn_rate,
        terminal_ids=[terminal_id(args.terminal_prefix, n) for n in range(1, args.terminals + 1)],
        first_card=int(args.first_card), cards=args.cards, pin=pin, tmk_hex=tmk)


def _profile_options(sp: argparse.ArgumentParser, dialect_default: str | None) -> None:
    """The terminal profile: the listeners it may use are those with its dialect and MAC method."""
    sp.add_argument("--dialect", choices=["cup", "iso87"], default=dialect_default)
    sp.add_argument("--mac", choices=["ecb", "x919", "off"],
                    help="how its messages are authenticated (default: ecb for cup, x919 for iso87; off only"
                         " on an unauthenticated loopback listener)")
    sp.add_argument("--double-mak", action=argparse.BooleanOptionalAction, default=None,
                    help="a double-length MAK (3DES MAC) in the sign-on; always with x919")
    sp.add_argument("--allow-single-des", action=argparse.BooleanOptionalAction, default=None,
                    help="allow sign-on with single-length keys (60.3 = 001)")


def admin_cmd(parent: Any, name: str, help_text: str, func: Any = None) -> argparse.ArgumentParser:
    """One ``admin`` command: database options, ``--json``, and the function that runs it."""
    sp = parent.add_parser(name, help=help_text)
    common.db_opts(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=func or cmd_admin)
    return sp


def add_parsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    """Adds ``admin`` and returns its sub-parsers, for commands defined in other modules."""
    admin_p = sub.add_parser("admin", help="manage merchants, terminals and cards")
    asub = admin_p.add_subparsers(dest="what", required=True)


    m = asub.add_parser("merchant").add_subparsers(dest="action", required=True)
    sp = admin_cmd(m, "add", "add a merchant")
    sp.add_argument("merchant_id")
    sp.add_argument("--name", required=True)
    sp.add_argument("--earn-rate", required=True, help="points per yuan spent")
    sp.add_argument("--issue-price", default="1", help="fen the merchant pays per point issued (clearing)")
    sp.add_argument("--redeem-value", default="1", help="fen one point is worth when spent here")
    sp = admin_cmd(m, "update", "change a merchant's name, rates or status")
    sp.add_argument("merchant_id")
    sp.add_argument("--name")
    sp.add_argument("--earn-rate", help="points per yuan spent")
    sp.add_argument("--issue-price", help="fen the merchant pays per point issued (clearing)")
    sp.add_argument("--redeem-value", help="fen one point is worth when spent here")
    sp.add_argument("--status", choices=["active", "suspended"], help="suspended: its terminals are declined 03")
    admin_cmd(m, "list", "list merchants")

    t = asub.add_parser("terminal").add_subparsers(dest="action", required=True)
    sp = admin_cmd(t, "add", "register a terminal")
    sp.add_argument("terminal_id")
    sp.add_argument("--merchant", required=True)
    sp.add_argument("--status", default="active", choices=["active", "disabled"])
    sp.add_argument("--tmk", metavar="-", help="import a terminal master key (32 hex digits) instead of generating"
                    " one: '-' reads it from standard input")
    _profile_options(sp, dialect_default="cup")
    sp = admin_cmd(t, "profile", "change how a terminal speaks and authenticates (it must sign on again)")
    sp.add_argument("terminal_id")
    _profile_options(sp, dialect_default=None)
    sp = admin_cmd(t, "rekey", "replace a terminal's master key (it must sign on again)")
    sp.add_argument("terminal_id")
    sp.add_argument("--tmk", metavar="-", help="import the new master key (32 hex digits): '-' reads it from"
                    " standard input; default: generate one")
    sp = admin_cmd(t, "api-key", "issue or rotate a terminal's JSON API key (shown once); it then speaks the API only")
    sp.add_argument("terminal_id")
    sp = admin_cmd(t, "list", "list terminals")
    sp.add_argument("--merchant")
    for action in ("disable", "enable"):
        admin_cmd(t, action, f"{action} a terminal").add_argument("terminal_id")

    c = asub.add_parser("card").add_subparsers(dest="action", required=True)
    sp = admin_cmd(c, "add", "issue a membership card")
    sp.add_argument("card_number")
    sp.add_argument("--name", required=True)
    sp.add_argument("--phone", default="")
    sp.add_argument("--pin", metavar="-", help="set a PIN: '-' reads it from standard input")
    sp.add_argument("--status", default="active", choices=["active", "blocked"])
    for action in ("block", "unblock"):
        admin_cmd(c, action, f"{action} a card").add_argument("card_number")
    sp = admin_cmd(c, "set-pin", "set a card's PIN (clears failed tries and a PIN lock)")
    sp.add_argument("card_number")
    sp.add_argument("--pin", metavar="-", required=True, help="'-': read the PIN from standard input")
    admin_cmd(c, "unlock-pin", "unlock a card locked after too many wrong PINs").add_argument("card_number")
    sp = admin_cmd(c, "show", "a card's balance and postings")
    sp.add_argument("card_number")
    sp.add_argument("--postings", type=int, default=50, help="how many recent postings")
    sp.add_argument("--reveal", action="store_true",
                    help="show the card number, holder name and phone in clear (recorded in the audit trail)")

    sp = admin_cmd(asub, "connectors", "upstream connectors as the running switch last reported them")
    sp.set_defaults(action="list")
    sp = admin_cmd(asub, "check", "verify the ledger invariants")
    sp.set_defaults(action="check")
    sp = admin_cmd(asub, "seed", "create the load-test merchant, terminals and cards that do not exist")
    sp.set_defaults(action="seed")
    sp.add_argument("--merchant", default="MLOAD0000000001")
    sp.add_argument("--earn-rate", default="1")
    sp.add_argument("--terminals", type=int, default=8)
    sp.add_argument("--terminal-prefix", default="L")
    sp.add_argument("--cards", type=int, default=1000)
    sp.add_argument("--first-card", default="6288990000000000")
    sp.add_argument("--tmk", metavar="-", help="master key of the load terminals created: '-' reads it from"
                    " standard input (default: generated and printed)")
    sp.add_argument("--pin", metavar="-", help="PIN of the load cards created: '-' reads it from"
                    " standard input, after --tmk - (default: 123456)")
    sp = admin_cmd(asub, "audit", "the audit trail: who changed what, and who revealed card data")
    sp.set_defaults(action="list")
    sp.add_argument("--since", type=_since, help="entries at or after this ISO 8601 time (local time if no zone)")
    sp.add_argument("--limit", type=_positive, default=100, help="the latest N entries (default 100)")
    return asub
