"""``pointswitch admin operator``: the web console's operator accounts.

    admin operator add NAME --role viewer|operator|admin   password from standard input
    admin operator passwd NAME                             new password from standard input
    admin operator role NAME ROLE
    admin operator disable NAME / enable NAME
    admin operator list

A password is never an argument (it would show in the process list and the shell
history): it is read from standard input, or asked for twice without echo on a
terminal. The work is in ``ledger.operators``; every change is audited.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from . import common
from .admin import admin_cmd


def _password(min_length: int) -> str:
    from ..ledger import operators
    from ..ledger.errors import AdminError

    if sys.stdin is not None and sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            sys.exit("pointswitch: the two passwords differ")
    else:
        password = (sys.stdin.readline() if sys.stdin is not None else "").rstrip("\r\n")
    try:
        operators.check_password_rules(password, min_length)
    except AdminError as exc:
        sys.exit(f"pointswitch: {exc}")
    return password


def cmd_operator(args: argparse.Namespace) -> int:
    from ..ledger import operators

    password_hash = None
    if args.action in ("add", "passwd"):  # the password is read before anything else happens
        password_hash = operators.hash_password(_password(common.config(args).console.min_password_length))
    if args.action == "add":
        assert password_hash is not None
        result: Any = common.with_db(args, lambda c, v: operators.add_operator(c, args.name, args.role, password_hash))
    elif args.action == "passwd":
        assert password_hash is not None
        result = common.with_db(args, lambda c, v: operators.set_password(c, args.name, password_hash))
    elif args.action == "role":
        result = common.with_db(args, lambda c, v: operators.set_role(c, args.name, args.role))
    elif args.action in ("disable", "enable"):
        result = common.with_db(args, lambda c, v: operators.set_disabled(c, args.name, args.action == "disable"))
    else:
        result = common.with_db(args, lambda c, v: operators.list_operators(c))
        common.print_result(result, args.json, _list_text)
        return 0
    common.print_result(result, args.json)
    return 0


def _list_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no operators: add the first with `pointswitch admin operator add NAME --role admin`"
    return "\n".join(
        f"{r['name']:<16} {r['role']:<8} {'disabled' if r['disabled'] else 'active':<8}"
        f" failed logins {r['failed_logins']}  locked until {r['locked_until'] or '-'}"
        f"  last sign-in {r['last_login_at'] or '-'}" for r in rows)


def add_parsers(asub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``admin operator ...``, under the admin sub-parsers ``cli.admin.add_parsers`` returns."""
    from ..ledger.operators import ROLES

    o = asub.add_parser("operator", help="operator accounts of the web console: add, passwd, role, disable, list")
    osub = o.add_subparsers(dest="action", required=True)
    sp = admin_cmd(osub, "add", "add an operator (the password is read from standard input)", cmd_operator)
    sp.add_argument("name")
    sp.add_argument("--role", required=True, choices=ROLES)
    admin_cmd(osub, "passwd", "set an operator's password (from standard input); ends their sessions,"
              " clears a lockout", cmd_operator).add_argument("name")
    sp = admin_cmd(osub, "role", "change an operator's role; ends their sessions", cmd_operator)
    sp.add_argument("name")
    sp.add_argument("role", choices=ROLES)
    for action in ("disable", "enable"):
        admin_cmd(osub, action, f"{action} an operator" + ("; ends their sessions" if action == "disable" else ""),
                  cmd_operator).add_argument("name")
    admin_cmd(osub, "list", "operators, their roles and lockouts", cmd_operator)
