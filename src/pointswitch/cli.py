"""``pointswitch``: serve, migrate, demo, admin, sim."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import logs

EXIT_USAGE = 2


def _config(args: argparse.Namespace) -> config_mod.Config:
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


def _print(data: Any, as_json: bool, text: Callable[[Any], str] | None = None) -> None:
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


def _yuan_to_fen(text: str) -> int:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in yuan") from None
    fen = value * 100
    if fen != fen.to_integral_value():
        raise argparse.ArgumentTypeError("an amount has at most 2 decimals (fen)")
    return int(fen)


# -- serve / migrate ------------------------------------------------------------
def _vault(cfg: config_mod.Config, embedded: bool) -> Any:
    from .app import resolve_vault
    from .ledger.vault import VaultError

    try:
        return resolve_vault(cfg, embedded=embedded)
    except VaultError as exc:
        sys.exit(f"pointswitch: {exc}")


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import install_uvloop, resolve_dsn, serve
    from .ledger.vault import VaultError

    cfg = _config(args)
    logs.configure(cfg.log_level)
    if not cfg.database.dsn:
        _vault(cfg, True)  # refuse before starting anything when the key is unusable
    else:
        _vault(cfg, False)
    dsn, embedded = resolve_dsn(cfg)
    vault = _vault(cfg, embedded is not None)
    install_uvloop()
    try:
        asyncio.run(serve(cfg, dsn, vault))
    except (VaultError, config_mod.ConfigError) as exc:
        sys.exit(f"pointswitch: {exc}")
    except OSError as exc:  # a port in use, a database that cannot be reached
        sys.exit(f"pointswitch: cannot start: {exc}")
    finally:
        if embedded:
            embedded.stop()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .app import database, resolve_dsn

    cfg = _config(args)
    logs.configure(cfg.log_level)
    dsn, embedded = resolve_dsn(cfg)

    async def run() -> None:
        async with database(cfg, dsn):
            pass

    try:
        asyncio.run(run())
    finally:
        if embedded:
            embedded.stop()
    print("migrations up to date")
    return 0


def _with_db(args: argparse.Namespace, fn: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """Run ``fn(connection, vault)`` against the configured database (migrated)."""
    from .app import database, resolve_dsn
    from .ledger.admin import AdminError
    from .ledger.vault import VaultError

    cfg = _config(args)
    logs.configure("warning")
    if cfg.database.dsn:
        _vault(cfg, False)
    dsn, embedded = resolve_dsn(cfg)
    vault = _vault(cfg, embedded is not None)

    async def run() -> Any:
        async with database(cfg, dsn, vault) as pool, pool.acquire() as con:
            return await fn(con, vault)

    try:
        return asyncio.run(run())
    except (AdminError, VaultError) as exc:
        sys.exit(f"pointswitch: {exc}")
    finally:
        if embedded:
            embedded.stop()


# -- admin ------------------------------------------------------------------------
def cmd_admin(args: argparse.Namespace) -> int:
    from .ledger import admin

    what, action = args.what, args.action
    if what == "merchant" and action == "add":
        result = _with_db(args, lambda c, v: admin.add_merchant(
            c, args.merchant_id, args.name, args.earn_rate, args.issue_price, args.redeem_value))
    elif what == "merchant" and action == "list":
        result = _with_db(args, lambda c, v: admin.list_merchants(c))
    elif what == "terminal" and action == "add":
        result = _with_db(args, lambda c, v: admin.add_terminal(
            c, v, args.terminal_id, args.merchant, args.status, args.tmk))
    elif what == "terminal" and action == "rekey":
        result = _with_db(args, lambda c, v: admin.rekey_terminal(c, v, args.terminal_id, args.tmk))
    elif what == "terminal" and action == "list":
        result = _with_db(args, lambda c, v: admin.list_terminals(c, merchant_id=args.merchant))
    elif what == "terminal" and action in ("disable", "enable"):
        status = "disabled" if action == "disable" else "active"
        result = _with_db(args, lambda c, v: admin.set_terminal_status(c, args.terminal_id, status))
    elif what == "card" and action == "add":
        result = _with_db(args, lambda c, v: admin.add_card(
            c, args.card_number, args.name, args.phone, args.pin, args.status))
    elif what == "card" and action in ("block", "unblock"):
        status = "blocked" if action == "block" else "active"
        result = _with_db(args, lambda c, v: admin.set_card_status(c, args.card_number, status))
    elif what == "card" and action == "set-pin":
        result = _with_db(args, lambda c, v: admin.set_pin(c, args.card_number, args.pin))
    elif what == "card" and action == "unlock-pin":
        result = _with_db(args, lambda c, v: admin.unlock_pin(c, args.card_number))
    elif what == "card" and action == "show":
        result = _with_db(args, lambda c, v: admin.show_card(c, args.card_number, args.postings))
    elif what == "check":
        problems = _with_db(args, lambda c, v: admin.check_invariants(c))
        _print({"ok": not problems, "problems": problems}, args.json,
               lambda d: "all ledger invariants hold" if d["ok"] else "\n".join(d["problems"]))
        return 0 if not problems else 1
    elif what == "seed":
        result = _with_db(args, lambda c, v: _seed(c, v, args))
    elif what == "connectors":
        result = _with_db(args, lambda c, v: admin.connectors(c))
        _print(result, args.json, _connectors_text)
        return 0
    else:  # pragma: no cover - argparse prevents it
        return EXIT_USAGE
    if isinstance(result, dict) and "tmk" in result and not args.json:
        print(f"terminal master key {result['tmk']}  check value {result['tmk_check_value']}")
        print("  (shown once: load it into the terminal now; it is stored only sealed under the master key)")
        result = {k: v for k, v in result.items() if k not in ("tmk",)}
    _print(result, args.json)
    return 0


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
        if st.get("last_error"):
            lines.append(f"{'':<10} last error: {st['last_error']}")
    return "\n".join(lines)


async def _seed(con: Any, vault: Any, args: argparse.Namespace) -> dict[str, Any]:
    """A merchant, N terminals and N cards for load tests (idempotent). All load
    terminals share one master key and all load cards one PIN hash: load-test data only."""
    import secrets

    from .codecs import crypto
    from .ledger import admin
    from .simulators.load import card_number, terminal_id

    tmk_hex = (args.tmk or secrets.token_hex(16)).upper()
    pin_hash = admin.hash_pin(args.pin)
    try:
        await admin.add_merchant(con, args.merchant, "Load Test Merchant", args.earn_rate)
    except admin.AdminError:
        pass
    existing = {t["terminal_id"] for t in await admin.list_terminals(con, merchant_id=args.merchant)}
    for n in range(1, args.terminals + 1):
        tid = terminal_id(args.terminal_prefix, n)
        if tid not in existing:
            await admin.add_terminal(con, vault, tid, args.merchant, tmk_hex=tmk_hex)
        else:
            await admin.rekey_terminal(con, vault, tid, tmk_hex)
    first = int(args.first_card)
    await admin.add_cards_in_bulk(con, first, args.cards, pin_hash)
    return {"merchant_id": args.merchant, "terminals": args.terminals, "cards": args.cards,
            "first_card": card_number(first, 0), "terminal_prefix": args.terminal_prefix,
            "tmk": tmk_hex, "tmk_check_value": crypto.check_value(bytes.fromhex(tmk_hex)).hex().upper()}


# -- demo ---------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .app import install_uvloop, resolve_dsn, running_switch
    from .config import ConnectorConfig, ListenerConfig, UsageConfig
    from .ledger import admin
    from .simulators.host import HostSimulator, Rule
    from .simulators.scenario import (
        DEMO_CARD,
        DEMO_MERCHANTS,
        DEMO_PIN,
        DEMO_SLOW_BANK_CARD,
        ScenarioFailed,
        Step,
        run_scenario,
    )
    from .simulators.terminal import describe

    data_dir = Path(args.data_dir or "var/demo")
    if data_dir.exists() and not args.keep:
        shutil.rmtree(data_dir)
    cfg = _config(args)
    cfg.database.dsn = None
    cfg.database.data_dir = str(data_dir)
    cfg.listeners = [ListenerConfig("cup", 0, "cup", "binary2", host="127.0.0.1"),
                     ListenerConfig("iso87", 0, "iso87", "ascii4", host="127.0.0.1")]
    logs.configure(args.log_level or "error")  # the scenario prints what happens; --log-level shows more
    print(f"starting embedded PostgreSQL in {data_dir} ...", flush=True)
    dsn, embedded = resolve_dsn(cfg)
    vault = _vault(cfg, True)  # the demo's own master key, generated into its data folder
    install_uvloop()

    last_balance: list[int] = []

    def show(step: Step) -> None:
        d = describe(step.reply)
        mark = "ok " if step.ok else "FAIL"
        balance = d["points_balance"]
        moved = "     "
        if balance is not None:
            if last_balance and balance != last_balance[-1]:
                moved = f"{balance - last_balance[-1]:>+5}"
            last_balance.append(balance)
        shown = f"balance {balance:>4}" if balance is not None else ""
        print(f"  {mark} rc {d['rc']}  {moved}  {shown:<13} {step.title}", flush=True)

    async def run() -> int:
        bank = await HostSimulator("bank", rules=[Rule(action="approve", delay_s=1.5, card=DEMO_SLOW_BANK_CARD)],
                                   ledger_file=data_dir / "bank-ledger.jsonl").start()
        insurer = await HostSimulator("insurer", ledger_file=data_dir / "insurer-ledger.jsonl").start()
        quick: dict[str, Any] = {"response_timeout_s": 1.0, "reversal_retry_s": 0.2, "backoff_initial_s": 0.1}
        cfg.connectors = [ConnectorConfig("bank", port=bank.port, **quick),
                          ConnectorConfig("insurer", port=insurer.port, **quick)]
        cfg.cash_out = UsageConfig(connector="bank", points_per_yuan="100", min_amount_fen=10)
        cfg.insurance = UsageConfig(connector="insurer", points_per_yuan="100", min_amount_fen=10)
        try:
            return await run_with_hosts(bank, insurer)
        finally:
            await bank.stop()
            await insurer.stop()

    async def run_with_hosts(bank: HostSimulator, insurer: HostSimulator) -> int:
        async with running_switch(cfg, dsn, vault) as running:
            tmks: dict[str, bytes] = {}
            async with running.pool.acquire() as con:
                for mid, name, rate, tid in DEMO_MERCHANTS:
                    await admin.add_merchant(con, mid, name, rate)
                    added = await admin.add_terminal(con, vault, tid, mid)
                    tmks[tid] = bytes.fromhex(added["tmk"])  # "loaded into the terminal"
                await admin.add_card(con, DEMO_CARD, "Li Lei", "13800000000", DEMO_PIN)
            host, port = running.address("cup")
            for connector in running.connectors.values():
                await connector.wait_available(5)
            print(f"switch listening: cup on {host}:{port}, iso87 on {running.address('iso87')[1]};"
                  f" bank host on {bank.port}, insurer host on {insurer.port}")
            print(f"demo network: {len(DEMO_MERCHANTS)} merchants, card {DEMO_CARD[:6]}*********{DEMO_CARD[-4:]}\n")
            try:
                await run_scenario(host, port, tmks, DEMO_CARD, report=show, upstream=True)
            except ScenarioFailed as exc:
                print(f"\nscenario failed: {exc}")
                return 1
            async with running.pool.acquire() as con:
                for _ in range(100):  # the late answer's reversal is stored and forwarded: wait for the ack
                    reversals = await admin.upstream_reversals(con)
                    if all(r["state"] == "acknowledged" for r in reversals):
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # and for the bank's late answer, which changes nothing
                problems = await admin.check_invariants(con)
                card = await admin.show_card(con, DEMO_CARD, postings_limit=0)
                merchants = await admin.list_merchants(con)
            print("\nmerchants (points issued / redeemed, derived from the journal):")
            for m in merchants:
                print(f"  {m['merchant_id']}  {m['name']:<12} issued {m['points_issued']:>4}"
                      f"  redeemed {m['points_redeemed']:>4}")
            for r in reversals:
                print(f"\nreversal owed to the bank ({r['reason']}): {r['state']} after {r['attempts']} attempt(s)")
            print(f"bank host: credited {bank.net_fen() / 100:.2f} yuan net ({len(bank.entries)} credits,"
                  f" {sum(e.reversed for e in bank.entries.values())} reversed);"
                  f" insurer host: collected {insurer.net_fen() / 100:.2f} yuan")
            print(f"card balance {card['points_balance']} points;",
                  "ledger invariants hold" if not problems else f"INVARIANTS BROKEN: {problems}")
            return 0 if not problems else 1

    try:
        return asyncio.run(run())
    finally:
        if embedded:
            embedded.stop()


# -- sim ----------------------------------------------------------------------------
def _state_path(terminal: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("pointswitch")) / "sim-terminals" / f"{terminal}.json"


def cmd_sim_host(args: argparse.Namespace) -> int:
    from .simulators.host import HostSimulator, Rule, load_rules

    logs.configure("info")  # on stderr: what the host credits, declines and reverses
    rules = load_rules(args.rules) if args.rules else []
    field = "card" if args.kind == "bank" else "policy"
    rules += [Rule(action="decline", rc="05", **{field: value}) for value in args.decline]
    if args.decline_amount_over is not None:
        rules.append(Rule(action="decline", rc="61", amount_over=args.decline_amount_over))
    if args.delay:
        rules.append(Rule(action="approve", delay_s=args.delay))
    host = HostSimulator(args.kind, args.host, args.port, args.framing, rules,
                         Path(args.ledger) if args.ledger else None, answer_reversals=not args.no_reversal_ack,
                         drop_every=args.drop_every)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with host:
            print(f"{args.kind} simulator on {args.host}:{host.port} ({len(rules)} rules)", flush=True)
            await stop.wait()
        print(f"{args.kind} simulator stopped: {len(host.entries)} entries, net {host.net_fen()} fen", flush=True)

    asyncio.run(run())
    return 0


def cmd_sim_terminal(args: argparse.Namespace) -> int:
    from .simulators.terminal import TerminalClient, TerminalError, describe

    state_file = _state_path(args.terminal)
    state: dict[str, Any] = {"trace": 0, "batch": 1, "history": {}}
    if state_file.exists():
        state = json.loads(state_file.read_text())

    if args.tmk:
        state["tmk"] = args.tmk.upper()  # "loading the master key into the terminal"

    def key(name: str) -> bytes | None:
        return bytes.fromhex(state[name]) if state.get(name) else None

    async def run() -> Any:
        client = TerminalClient(args.host, args.port, args.terminal, args.merchant,
                                dialect_name=args.dialect, framing_name=args.framing,
                                batch=state["batch"], trace=state["trace"], timeout_s=args.timeout,
                                tmk=key("tmk"), default_pin=args.pin, pik=key("pik"), mak=key("mak"),
                                tdk=key("tdk"))
        async with client:
            op = args.op
            if op == "sign-on":
                reply = await client.sign_on(args.key_scheme)
            elif op == "sign-off":
                reply = await client.sign_off()
            elif op == "echo":
                reply = await client.echo()
            elif op == "inquiry":
                reply = await client.inquiry(args.card)
            elif op == "accrue":
                reply = await client.accrue(args.card, args.amount, tamper=args.tamper)
            elif op == "redeem":
                reply = await client.send(client.request("redeem", args.card, args.amount), tamper=args.tamper)
            elif op == "cash-out":
                reply = await client.cash_out(args.card, args.amount, args.bank_card)
            elif op == "insurance":
                reply = await client.insurance(args.card, args.amount, args.policy)
            else:
                original = state["history"].get(f"{int(args.trace):06d}")
                if original is None:
                    sys.exit(f"pointswitch: no transaction with trace {args.trace} in {state_file}")
                from .simulators.terminal import Reply

                orig = Reply(original["request"], original["reply"])
                if op == "void":
                    reply = await client.void(orig)
                elif op == "refund":
                    reply = await client.refund(orig, args.amount)
                else:
                    reply = await client.reverse(orig.request)
            state["trace"], state["batch"] = client.trace, client.batch
            if op == "sign-off":
                client.pik = client.mak = client.tdk = None
            for name in ("pik", "mak", "tdk"):  # the terminal's working keys, kept like its secure memory
                value = getattr(client, name)
                state[name] = value.hex().upper() if value else None
            if reply.request.get("t") in ("0200", "0220"):
                request = {k: v for k, v in reply.request.items() if k not in ("52", "64")}
                state["history"][reply.request["11"]] = {"request": request, "reply": reply.fields}
                while len(state["history"]) > 200:
                    state["history"].pop(next(iter(state["history"])))
            return describe(reply)

    try:
        result = asyncio.run(run())
    except (TerminalError, OSError) as exc:
        sys.exit(f"pointswitch: {exc}")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the terminal's keys
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state))
    _print(result, args.json, lambda d: "\n".join(f"{k:<15} {v}" for k, v in d.items() if v is not None))
    return 0 if result["rc"] == "00" else 1


def cmd_sim_load(args: argparse.Namespace) -> int:
    from .app import install_uvloop
    from .simulators.load import LoadPlan, run_load

    mix = {}
    for part in args.mix.split(","):
        name, _, weight = part.partition("=")
        if name not in ("accrue", "inquiry", "redeem", "cash_out") or not weight.isdigit():
            sys.exit("pointswitch: --mix is like accrue=80,inquiry=10,redeem=10 (also cash_out=N)")
        mix[name] = int(weight)
    plan = LoadPlan(
        host=args.host, port=args.port, merchant_id=args.merchant, terminal_prefix=args.terminal_prefix,
        connections=args.connections, depth=args.depth,
        duration_s=None if args.count else args.duration, count=args.count,
        first_card=int(args.first_card), cards=args.cards, mix=mix, dialect=args.dialect,
        framing=args.framing, seed=args.seed,
        tmk=bytes.fromhex(args.tmk) if args.tmk else None, pin=args.pin,
    )
    install_uvloop()
    report = asyncio.run(run_load(plan, progress=None if args.json else sys.stderr))
    _print(report.as_dict(), args.json, lambda _d: report.render())
    return 0 if report.latencies_ms else 1


# -- parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pointswitch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def db_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML file (default: $POINTSWITCH_CONFIG)")
        sp.add_argument("--dsn", help="PostgreSQL DSN (default: $POINTSWITCH_DSN, else embedded)")
        sp.add_argument("--data-dir", help="embedded PostgreSQL folder (default: $POINTSWITCH_DATA_DIR)")

    sp = sub.add_parser("serve", help="run the switch")
    db_opts(sp)
    sp.add_argument("--log-level", choices=list(logs.LEVELS))
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("migrate", help="apply pending database migrations")
    db_opts(sp)
    sp.set_defaults(func=cmd_migrate, log_level=None)

    sp = sub.add_parser("demo", help="start the switch on a fresh demo network and run the scenario")
    sp.add_argument("--data-dir", help="demo database folder (default: var/demo, recreated)")
    sp.add_argument("--keep", action="store_true", help="keep an existing demo database")
    sp.add_argument("--log-level", choices=list(logs.LEVELS))
    sp.set_defaults(func=cmd_demo, config=None)

    admin_p = sub.add_parser("admin", help="manage merchants, terminals and cards")
    asub = admin_p.add_subparsers(dest="what", required=True)

    def admin_cmd(parent: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_text)
        db_opts(sp)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=cmd_admin)
        return sp

    m = asub.add_parser("merchant").add_subparsers(dest="action", required=True)
    sp = admin_cmd(m, "add", "add a merchant")
    sp.add_argument("merchant_id")
    sp.add_argument("--name", required=True)
    sp.add_argument("--earn-rate", required=True, help="points per yuan spent")
    sp.add_argument("--issue-price", default="1", help="fen the merchant pays per point issued (clearing)")
    sp.add_argument("--redeem-value", default="1", help="fen one point is worth when spent here")
    admin_cmd(m, "list", "list merchants")

    t = asub.add_parser("terminal").add_subparsers(dest="action", required=True)
    sp = admin_cmd(t, "add", "register a terminal")
    sp.add_argument("terminal_id")
    sp.add_argument("--merchant", required=True)
    sp.add_argument("--status", default="active", choices=["active", "disabled"])
    sp.add_argument("--tmk", help="import this terminal master key (32 hex digits) instead of generating one")
    sp = admin_cmd(t, "rekey", "replace a terminal's master key (it must sign on again)")
    sp.add_argument("terminal_id")
    sp.add_argument("--tmk", help="the new master key (32 hex digits); default: generate one")
    sp = admin_cmd(t, "list", "list terminals")
    sp.add_argument("--merchant")
    for action in ("disable", "enable"):
        admin_cmd(t, action, f"{action} a terminal").add_argument("terminal_id")

    c = asub.add_parser("card").add_subparsers(dest="action", required=True)
    sp = admin_cmd(c, "add", "issue a membership card")
    sp.add_argument("card_number")
    sp.add_argument("--name", required=True)
    sp.add_argument("--phone", default="")
    sp.add_argument("--pin", help="PIN (stored as a salted scrypt hash)")
    sp.add_argument("--status", default="active", choices=["active", "blocked"])
    for action in ("block", "unblock"):
        admin_cmd(c, action, f"{action} a card").add_argument("card_number")
    sp = admin_cmd(c, "set-pin", "set a card's PIN (clears failed tries and a PIN lock)")
    sp.add_argument("card_number")
    sp.add_argument("--pin", required=True)
    admin_cmd(c, "unlock-pin", "unlock a card locked after too many wrong PINs").add_argument("card_number")
    sp = admin_cmd(c, "show", "a card's balance and postings")
    sp.add_argument("card_number")
    sp.add_argument("--postings", type=int, default=50, help="how many recent postings")

    sp = admin_cmd(asub, "connectors", "upstream connectors as the running switch last reported them")
    sp.set_defaults(action="list")
    sp = admin_cmd(asub, "check", "verify the ledger invariants")
    sp.set_defaults(action="check")
    sp = admin_cmd(asub, "seed", "create a load-test merchant, terminals and cards")
    sp.set_defaults(action="seed")
    sp.add_argument("--merchant", default="MLOAD0000000001")
    sp.add_argument("--earn-rate", default="1")
    sp.add_argument("--terminals", type=int, default=8)
    sp.add_argument("--terminal-prefix", default="L")
    sp.add_argument("--cards", type=int, default=1000)
    sp.add_argument("--first-card", default="6288990000000000")
    sp.add_argument("--tmk", help="master key for all load terminals (default: generated and printed)")
    sp.add_argument("--pin", default="123456", help="PIN of all load cards")

    sim = sub.add_parser("sim", help="simulators").add_subparsers(dest="sim", required=True)
    st = sim.add_parser("terminal", help="a UnionPay-style POS terminal")
    st.add_argument("op", choices=["sign-on", "sign-off", "echo", "inquiry", "accrue", "redeem",
                                   "cash-out", "insurance", "void", "refund", "reverse"])
    st.add_argument("--host", default=os.environ.get("POINTSWITCH_HOST", "127.0.0.1"))
    st.add_argument("--port", type=int, default=5000)
    st.add_argument("--dialect", default="cup", choices=["cup", "iso87"])
    st.add_argument("--framing", default="binary2", choices=["binary2", "ascii4"])
    st.add_argument("--terminal", required=True, help="terminal id (field 41)")
    st.add_argument("--merchant", required=True, help="merchant id (field 42)")
    st.add_argument("--card", help="card number (field 2)")
    st.add_argument("--amount", type=_yuan_to_fen, help="amount in yuan, e.g. 12.50")
    st.add_argument("--trace", help="trace of the original (void, refund, reverse)")
    st.add_argument("--bank-card", help="the bank card to credit (cash-out, field 48)")
    st.add_argument("--policy", help="the policy whose premium is paid (insurance, field 48)")
    st.add_argument("--tmk", help="load this terminal master key (32 hex digits); kept in the terminal's state")
    st.add_argument("--pin", help="the member's PIN, typed on the PIN pad (inquiry, redeem)")
    st.add_argument("--key-scheme", default="003", choices=["001", "003", "004"], help="sign-on 60.3")
    st.add_argument("--tamper", action="store_true",
                    help="change one byte of the message after its MAC was computed (shows the A0 path)")
    st.add_argument("--timeout", type=float, default=10.0)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_sim_terminal)

    for kind in ("bank", "insurer"):
        sh = sim.add_parser(kind, help=f"an upstream {kind} host (iso87) that pointswitch connects to")
        sh.add_argument("--host", default="127.0.0.1")
        sh.add_argument("--port", type=int, default=6000 if kind == "bank" else 6001)
        sh.add_argument("--framing", default="ascii4", choices=["binary2", "ascii4"])
        sh.add_argument("--rules", help="TOML file of [[rule]] tables (action, rc, delay_s, card, policy, amount_over,"
                                        " times)")
        sh.add_argument("--decline-card" if kind == "bank" else "--decline-policy", action="append", default=[],
                        dest="decline", help="decline requests for this card / policy (05); repeatable")
        sh.add_argument("--decline-amount-over", type=int, help="decline amounts above this many fen (61)")
        sh.add_argument("--delay", type=float, default=0.0, help="answer every request this many seconds late")
        sh.add_argument("--drop-every", type=int, default=0, help="never answer every Nth request")
        sh.add_argument("--no-reversal-ack", action="store_true", help="receive reversals but never acknowledge")
        sh.add_argument("--ledger", help="append what is credited / collected and reversed to this JSON-lines file")
        sh.set_defaults(func=cmd_sim_host, kind=kind)

    sl = sim.add_parser("load", help="load generator")
    sl.add_argument("--host", default="127.0.0.1")
    sl.add_argument("--port", type=int, default=5000)
    sl.add_argument("--dialect", default="cup", choices=["cup", "iso87"])
    sl.add_argument("--framing", default="binary2", choices=["binary2", "ascii4"])
    sl.add_argument("--merchant", default="MLOAD0000000001")
    sl.add_argument("--terminal-prefix", default="L")
    sl.add_argument("--connections", type=int, default=8)
    sl.add_argument("--depth", type=int, default=1, help="requests outstanding per connection")
    sl.add_argument("--duration", type=float, default=10.0, help="seconds")
    sl.add_argument("--count", type=int, help="total requests (instead of a duration)")
    sl.add_argument("--cards", type=int, default=1000)
    sl.add_argument("--first-card", default="6288990000000000")
    sl.add_argument("--mix", default="accrue=80,inquiry=10,redeem=10")
    sl.add_argument("--seed", type=int, default=None, help="random seed (default: fresh each run)")
    sl.add_argument("--tmk", help="master key of the load terminals (from admin seed)")
    sl.add_argument("--pin", default="123456", help="PIN of the load cards")
    sl.add_argument("--json", action="store_true")
    sl.set_defaults(func=cmd_sim_load)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sim" and args.sim == "terminal":
        needs_card = args.op in ("inquiry", "accrue", "redeem", "cash-out", "insurance")
        if needs_card and not args.card:
            sys.exit("pointswitch: --card is required for " + args.op)
        if args.op == "cash-out" and not args.bank_card:
            sys.exit("pointswitch: --bank-card is required for cash-out")
        if args.op == "insurance" and not args.policy:
            sys.exit("pointswitch: --policy is required for insurance")
        if args.op in ("accrue", "redeem", "refund", "cash-out", "insurance") and args.amount is None:
            sys.exit("pointswitch: --amount is required for " + args.op)
        if args.op in ("void", "refund", "reverse") and not args.trace:
            sys.exit("pointswitch: --trace of the original is required for " + args.op)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
