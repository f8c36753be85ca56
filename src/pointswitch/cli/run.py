"""``pointswitch serve`` and ``pointswitch migrate``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .. import config as config_mod
from .. import logs
from . import common


def cmd_serve(args: argparse.Namespace) -> int:
    from ..app import install_uvloop, serve
    from ..ledger.database import DatabaseStartError
    from ..ledger.vault import VaultError

    cfg = common.config(args)
    logs.configure(cfg.log_level)
    if not cfg.database.dsn:
        common.vault(cfg, True)  # refuse before starting anything when the key is unusable
    else:
        common.vault(cfg, False)
    dsn, embedded = common.resolve_dsn(cfg)
    vault = common.vault(cfg, embedded is not None)
    if embedded is not None and cfg.database.restart_embedded:
        embedded.watch()  # restarts the embedded PostgreSQL if it dies while the switch runs
    install_uvloop()
    try:
        asyncio.run(serve(cfg, dsn, vault))
    except (VaultError, config_mod.ConfigError) as exc:
        sys.exit(f"pointswitch: {exc}")
    except (OSError, DatabaseStartError) as exc:  # a port in use; a database that cannot be reached
        sys.exit(f"pointswitch: cannot start: {exc}")
    finally:
        if embedded:
            embedded.stop()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from ..app import database
    from ..ledger.database import DatabaseStartError
    from ..ledger.vault import VaultError

    cfg = common.config(args)
    logs.configure(cfg.log_level)
    if cfg.database.dsn:
        common.vault(cfg, False)  # refuse before anything when the key is unusable
    dsn, embedded = common.resolve_dsn(cfg)
    vault = common.vault(cfg, embedded is not None)  # converting clear card data needs the vault

    async def run() -> None:
        async with database(cfg, dsn, vault):
            pass

    try:
        asyncio.run(run())
    except VaultError as exc:
        sys.exit(f"pointswitch: {exc}")
    except DatabaseStartError as exc:
        sys.exit(f"pointswitch: cannot start: {exc}")
    finally:
        if embedded:
            embedded.stop()
    print("migrations up to date")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sp = sub.add_parser("serve", help="run the switch")
    common.db_opts(sp)
    sp.add_argument("--log-level", choices=list(logs.LEVELS))
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("migrate", help="apply pending database migrations")
    common.db_opts(sp)
    sp.set_defaults(func=cmd_migrate, log_level=None)
