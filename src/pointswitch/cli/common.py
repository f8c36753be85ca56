"""What every ``pointswitch`` command shares: settings, the database, printing."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from .. import config as config_mod
from .. import logs

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
            print("  ".join(f"{k}={v}" for k, v in row.items() if k != "postings"))
            for p in row.get("postings", []) if isinstance(row, dict) else []:
                print(f"    {p['at']}  {p['points']:>+8}  {p['operation']:<16} {p['reason']:<9}"
                      f" merchant={p['merchant_id']} terminal={p['terminal_id']} rrn={p['rrn']}")


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


def with_db(args: argparse.Namespace, fn: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """Run ``fn(connection, vault)`` against the configured database (migrated)."""
    from ..app import database, resolve_dsn
    from ..ledger.admin import AdminError
    from ..ledger.pins import PinFormatError
    from ..ledger.vault import VaultError

    cfg = config(args)
    logs.configure("warning")
    if cfg.database.dsn:
        vault(cfg, False)
    dsn, embedded = resolve_dsn(cfg)
    the_vault = vault(cfg, embedded is not None)

    async def run() -> Any:
        async with database(cfg, dsn, the_vault) as pool, pool.acquire() as con:
            return await fn(con, the_vault)

    try:
        return asyncio.run(run())
    except (AdminError, PinFormatError, VaultError) as exc:
        sys.exit(f"pointswitch: {exc}")
    finally:
        if embedded:
            embedded.stop()
