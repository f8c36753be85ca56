"""``pointswitch serve`` and ``pointswitch migrate``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from .. import config as config_mod
from .. import logs
from ..config import WORKER_ENV
from . import common


def cmd_serve(args: argparse.Namespace) -> int:
    from ..app import install_uvloop, serve
    from ..ledger.database import DatabaseStartError
    from ..ledger.vault import VaultError

    cfg = common.config(args)
    if getattr(args, "workers", None) is not None:
        if not 1 <= args.workers <= 64:
            sys.exit(f"pointswitch: --workers is 1 to 64, not {args.workers}")
        cfg.workers = args.workers
    logs.configure(cfg.log_level)
    if cfg.workers > 1 and not os.environ.get(WORKER_ENV):
        return _serve_workers(args, cfg)
    if os.environ.get(WORKER_ENV):  # every line of a worker says which one
        import structlog

        structlog.contextvars.bind_contextvars(worker=int(os.environ[WORKER_ENV]))
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


def _serve_workers(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    """``serve --workers N``: N processes share each listener's port (SO_REUSEPORT; the
    kernel spreads connections over them). This process prepares the database (starts
    the embedded server, migrates) once, starts the workers on it, passes SIGTERM and
    SIGINT on, and stops them all when one of them stops."""
    import signal
    import subprocess
    import time

    from ..app import database
    from ..ledger.database import DatabaseStartError

    if any(lc.port == 0 for lc in cfg.listeners):
        sys.exit("pointswitch: serve --workers needs fixed listener ports (a port 0 would differ in each worker)")
    if not cfg.database.dsn:
        common.vault(cfg, True)
    dsn, embedded = common.resolve_dsn(cfg)
    vault = common.vault(cfg, embedded is not None)

    async def prepare() -> None:
        async with database(cfg, dsn, vault):
            pass

    env = dict(os.environ, POINTSWITCH_DSN=dsn)
    if embedded is not None and not env.get("POINTSWITCH_MASTER_KEY") and not cfg.security.master_key_file:
        env["POINTSWITCH_SECURITY_MASTER_KEY_FILE"] = str(cfg.data_dir / "master.key")  # the path, not the key
    argv = sys.argv[1:]
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)

    try:
        asyncio.run(prepare())
        if embedded is not None and cfg.database.restart_embedded:
            embedded.watch()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        for n in range(cfg.workers):
            workers.append(subprocess.Popen([sys.executable, "-m", "pointswitch", *argv],
                                            env={**env, WORKER_ENV: str(n)}))
        codes: dict[int, int] = {}
        while len(codes) < len(workers):
            for n, w in enumerate(workers):
                if n not in codes and w.poll() is not None:
                    codes[n] = w.returncode
                    if not stopping:  # a worker stopped by itself: stop the others, report it
                        print(f"pointswitch: worker {n} exited {w.returncode}: stopping the others", file=sys.stderr)
                        stop(0, None)
            time.sleep(0.1)
        return 0 if all(code == 0 for code in codes.values()) else 1
    except DatabaseStartError as exc:
        sys.exit(f"pointswitch: cannot start: {exc}")
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        if embedded:
            embedded.stop()


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
    sp.add_argument("--workers", type=int, help="processes sharing the listeners' ports (default: [workers] or 1)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("migrate", help="apply pending database migrations")
    common.db_opts(sp)
    sp.set_defaults(func=cmd_migrate, log_level=None)
