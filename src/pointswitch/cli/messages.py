"""Messages to members and merchants, for operators, and the local catcher.

    admin card contact add CARD --sms PHONE | --email ADDRESS [--lang zh-CN|en]
    admin card contact list CARD
    admin card contact opt-out|opt-in CARD --channel sms|email
    admin merchant contact add M --webhook URL --secret - | --sms PHONE | --email ADDRESS [--lang]
    admin merchant contact list M
    admin merchant contact opt-out|opt-in M --channel sms|email|webhook
    admin messages list [--failed] [--limit N]
    admin messages retry ID
    sim inbox [--http-port 8025] [--smtp-port 2525] [--out FILE] [--webhook-secret MERCHANT ...]

Secrets (a webhook's signing secret) are read from standard input (``-``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from . import common
from .admin import admin_cmd


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    """The sub-command table of a parser built elsewhere (``admin card``, ``sim``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(f"{parser.prog} has no sub-commands")


def _channel_and_address(args: argparse.Namespace) -> tuple[str, str]:
    given = [(ch, getattr(args, ch)) for ch in ("sms", "email", "webhook") if getattr(args, ch, None)]
    if len(given) != 1:
        sys.exit("pointswitch: give exactly one of " + ", ".join(
            f"--{ch}" for ch in ("sms", "email", "webhook") if hasattr(args, ch)))
    return given[0]


def cmd_contact(args: argparse.Namespace) -> int:
    from ..ledger import contacts

    card = args.what == "card"
    secret = common.secret(getattr(args, "secret", None), "--secret", "webhook signing secret")
    if args.contact_action == "add":
        channel, address = _channel_and_address(args)
        if card:
            result = common.with_db(args, lambda c, v: contacts.add_card_contact(
                c, v, args.ref, channel, address, args.lang))
        else:
            result = common.with_db(args, lambda c, v: contacts.add_merchant_contact(
                c, v, args.ref, channel, address, secret, args.lang))
    elif args.contact_action == "list":
        result = common.with_db(args, lambda c, v: contacts.card_contacts(c, v, args.ref) if card
                                else contacts.merchant_contacts(c, args.ref))
    else:
        opt_in = args.contact_action == "opt-in"
        result = common.with_db(args, lambda c, v: contacts.set_card_opt_in(c, v, args.ref, args.channel, opt_in)
                                if card else contacts.set_merchant_opt_in(c, args.ref, args.channel, opt_in))
    common.print_result(result, args.json)
    return 0


def cmd_messages(args: argparse.Namespace) -> int:
    from ..ledger import outbox

    if args.action == "retry":
        result = common.with_db(args, lambda c, v: outbox.retry(c, args.message_id))
        common.print_result(result, args.json)
        return 0
    rows = common.with_db(args, lambda c, v: outbox.list_messages(c, failed=args.failed, limit=args.limit))
    common.print_result(rows, args.json, _messages_text)
    return 0


def _messages_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no messages"
    return "\n".join(
        f"{r['message_id']:>8}  {r['created_at']}  {r['kind']:<18} {r['recipient']:<20} {r['channel']:<7}"
        f" {r['address']:<24} {r['state']:<9} attempts {r['attempts']}"
        + (f"  next {r['next_attempt_at']}" if r["next_attempt_at"] else "")
        + (f"  ({r['last_error']})" if r["last_error"] else "")
        for r in rows)


def cmd_sim_inbox(args: argparse.Namespace) -> int:
    from ..simulators.inbox import Inbox

    secrets = {}
    for merchant in args.webhook_secret or []:
        value = common.secret("-", "--webhook-secret", f"webhook secret of {merchant}")
        assert value is not None
        secrets[merchant] = value.encode()
    inbox = Inbox(args.host, args.http_port, args.smtp_port, secrets,
                  Path(args.out) if args.out else None, echo=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await inbox.start()
        print(f"inbox: SMS gateway {inbox.sms_url}, webhooks http://{inbox.bound_http[0]}:{inbox.bound_http[1]}"
              f"/webhook/<merchant>, SMTP {inbox.bound_smtp[0]}:{inbox.bound_smtp[1]}", file=sys.stderr, flush=True)
        await stop.wait()
        await inbox.stop()

    asyncio.run(run())
    return 0


def _contact_parsers(parent: Any, what: str) -> None:
    contact = parent.add_parser("contact", help=f"how the {what} is told: SMS, e-mail"
                                + (", webhook" if what == "merchant" else ""))
    csub = contact.add_subparsers(dest="contact_action", required=True)
    ref_help = "card number" if what == "card" else "merchant id"
    sp = admin_cmd(csub, "add", "subscribe on a channel (replaces that channel's address; opts in)", cmd_contact)
    sp.add_argument("ref", metavar=what.upper(), help=ref_help)
    sp.add_argument("--sms", metavar="PHONE")
    sp.add_argument("--email", metavar="ADDRESS")
    if what == "merchant":
        sp.add_argument("--webhook", metavar="URL")
        sp.add_argument("--secret", metavar="-", help="the webhook's signing secret: '-' reads it from standard input")
    sp.add_argument("--lang", default="zh-CN", choices=["zh-CN", "en"])
    sp = admin_cmd(csub, "list", "the contacts (addresses masked)", cmd_contact)
    sp.add_argument("ref", metavar=what.upper(), help=ref_help)
    for action in ("opt-out", "opt-in"):
        sp = admin_cmd(csub, action, f"{action} of messages on a channel", cmd_contact)
        sp.add_argument("ref", metavar=what.upper(), help=ref_help)
        sp.add_argument("--channel", required=True,
                        choices=["sms", "email", "webhook"] if what == "merchant" else ["sms", "email"])


def add_parsers(root: argparse.ArgumentParser, admin_sub: Any) -> None:
    for what in ("card", "merchant"):
        _contact_parsers(_subparsers(admin_sub.choices[what]), what)
    msub = admin_sub.add_parser("messages", help="messages to members and merchants").add_subparsers(
        dest="action", required=True)
    sp = admin_cmd(msub, "list", "the latest messages, newest first", cmd_messages)
    sp.add_argument("--failed", action="store_true", help="only those given up")
    sp.add_argument("--limit", type=int, default=50)
    sp = admin_cmd(msub, "retry", "send a failed message again", cmd_messages)
    sp.add_argument("message_id", type=int)
    sim = _subparsers(_subparsers(root).choices["sim"])
    si = sim.add_parser("inbox", help="catch the messages the switch sends: SMS gateway, webhooks, SMTP")
    si.add_argument("--host", default="127.0.0.1")
    si.add_argument("--http-port", type=int, default=8025, help="SMS gateway (/sms) and webhooks (/webhook/M)")
    si.add_argument("--smtp-port", type=int, default=2525)
    si.add_argument("--out", help="append what is received to this file (JSON lines)")
    si.add_argument("--webhook-secret", action="append", metavar="MERCHANT",
                    help="check this merchant's webhooks; its secret is read from standard input (repeatable)")
    si.set_defaults(func=cmd_sim_inbox)
