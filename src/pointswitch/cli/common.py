"""What every ``pointswitch`` command shares: settings, the database, printing."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from .. import config as config_mod
from .. import logs

if TYPE_CHECKING:
    from ..ledger.database import EmbeddedServer

EXIT_USAGE = 2


def db_opts(sp: argparse.ArgumentParser) -> None:
    """The options that say which database (and so which master key) a command uses."""
    sp.add_argument("--config", help="TOML file (default: $POINTSWITCH_CONFIG)")
    sp.add_argument("--dsn", help="PostgreSQL DSN (default: $POINTSWITCH_DSN, else embedded)")
    sp.add_argument("--data-dir", help="embedded PostgreSQL folder (default: $POINTSWITCH_DATA_DIR)")


def config(args: argparse.Namespace) -> config_mod.Config:
    try:
        cfg = config_mod.load(getattr(args, "config", None))
    except config_mod.ConfigError as exc:
        sys.exit(f"pointswitch: {exc}")
    if getattr(args, "dsn", None):
        cfg.database.dsn = args.dsn
    if getattr(args, "data_dir", None):
        cfg.database.data_dir = args.data_dir
    if getattr(args, "log_level", None):
        cfg.log_level = args.log_level
    return cfg


def print_result(data: Any, as_json: bool, text: Callable[[Any], str] | None = None) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    elif text is not None:
        print(text(data))
    else:
        rows = data if isinstance(data, list) else [data]
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in row.items() if k not in ("postings", "points_by_expiry")))
            expiry = row.get("points_by_expiry") if isinstance(row, dict) else None
            if expiry is not None:  # a card: its points by the date they expire (docs/expiry.md)
                for day, points in expiry["expiring"].items():
                    print(f"    expires {day}  {points:>8} points")
                print(f"    never expiring   {expiry['never_expiring']:>8} points")
            for p in row.get("postings", []) if isinstance(row, dict) else []:
                print(f"    {p['at']}  {p['points']:>+8}  {p['operation']:<16} {p['reason']:<9}"
                      f" merchant={p['merchant_id']} terminal={p['terminal_id']} rrn={p['rrn']}")


STDIN = "-"  # a secret option's value meaning "read it from standard input"


def secret(value: str | None, option: str, what: str, *, literal_ok: bool = False) -> str | None:
    """The value of a secret option (``--pin``, ``--tmk``).

    ``-`` reads one line from standard input; on an interactive terminal it
    prompts without echo. A literal value is refused (unless ``literal_ok``, for
    the simulators): it would show in the process list and the shell history."""
    if value is None:
        return None
    if value != STDIN:
        if literal_ok:
            return value
        print(f"pointswitch: {option} takes no value on the command line, where it would show in the process"
              f" list and the shell history: give {option} {STDIN} and type the {what} when asked, or pipe it"
              f" on standard input", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if sys.stdin is not None and sys.stdin.isatty():
        text = getpass.getpass(f"{what}: ")
    else:
        text = sys.stdin.readline() if sys.stdin is not None else ""
    text = text.strip()
    if not text:
        sys.exit(f"pointswitch: {option} {STDIN}: no {what} on standard input")
    return text


def yuan_to_fen(text: str) -> int:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in yuan") from None
    fen = value * 100
    if fen != fen.to_integral_value():
        raise argparse.ArgumentTypeError("an amount has at most 2 decimals (fen)")
    return int(fen)


def vault(cfg: config_mod.Config, embedded: bool) -> Any:
    from ..app import resolve_vault
    from ..ledger.vault import VaultError

    try:
        return resolve_vault(cfg, embedded=embedded)
    except VaultError as exc:
        sys.exit(f"pointswitch: {exc}")


def resolve_dsn(cfg: config_mod.Config) -> tuple[str, EmbeddedServer | None]:
    """``app.resolve_dsn``: the DSN and the embedded server (or None). An embedded server
    that does not start ends the command with one line on stderr, exit code 1."""
    from ..app import resolve_dsn as resolve
    from ..ledger.database import DatabaseStartError

    try:
        return resolve(cfg)
    except DatabaseStartError as exc:
        sys.exit(f"pointswitch: cannot start: {exc}")


def on_database(args: argparse.Namespace, fn: Callable[[Any, Any, config_mod.Config], Awaitable[Any]],
                errors: tuple[type[Exception], ...] = ()) -> Any:
    """Run ``fn(pool, vault, config)`` against the configured database (migrated). An
    error of ``errors`` (or the vault's) ends the command with its message on stderr,
    exit code 1; a database that cannot be reached, with "cannot start"."""
    from ..app import database
    from ..ledger.database import DatabaseStartError
    from ..ledger.vault import VaultError

    cfg = config(args)
    logs.configure("warning")
    if cfg.database.dsn:
        vault(cfg, False)
    dsn, embedded = resolve_dsn(cfg)
    the_vault = vault(cfg, embedded is not None)

    async def run() -> Any:
        async with database(cfg, dsn, the_vault) as pool:
            return await fn(pool, the_vault, cfg)

    expected: tuple[type[Exception], ...] = (VaultError, *errors)
    try:
        return asyncio.run(run())
    except expected as exc:
        sys.exit(f"pointswitch: {exc}")
    except DatabaseStartError as exc:
        sys.exit(f"pointswitch: cannot start: {exc}")
    finally:
        if embedded:
            embedded.stop()


def with_db(args: argparse.Namespace, fn: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """Run ``fn(connection, vault)`` against the configured database (migrated)."""
    from ..ledger.admin import AdminError
    from ..ledger.pins import PinFormatError

    async def on_connection(pool: Any, the_vault: Any, _cfg: config_mod.Config) -> Any:
        async with pool.acquire() as con:
            return await fn(con, the_vault)

    return on_database(args, on_connection, (AdminError, PinFormatError))


def with_ledger(args: argparse.Namespace, fn: Callable[[Any, config_mod.Config], Awaitable[Any]],
                errors: tuple[type[Exception], ...] = ()) -> Any:
    """Run ``fn(ledger, config)`` against the configured database (migrated): for
    commands that move points or close days, in transactions of their own."""
    from ..ledger import Ledger

    async def on_ledger(pool: Any, the_vault: Any, cfg: config_mod.Config) -> Any:
        ledger = Ledger(pool, the_vault, pin_workers=1)
        try:
            return await fn(ledger, cfg)
        finally:
            ledger.close()

    return on_database(args, on_ledger, errors)
