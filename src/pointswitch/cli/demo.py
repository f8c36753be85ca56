"""``pointswitch demo``: the switch on a fresh demo network, the scenario driven through the terminal simulator."""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path
from typing import Any

from .. import logs
from . import common, demo_messages


def cmd_demo(args: argparse.Namespace) -> int:
    from ..app import install_uvloop, running_switch
    from ..config import ConnectorConfig, ListenerConfig, UsageConfig
    from ..ledger import admin
    from ..simulators.host import HostSimulator, Rule
    from ..simulators.scenario import (
        DEMO_CARD,
        DEMO_MERCHANTS,
        DEMO_PIN,
        DEMO_SLOW_BANK_CARD,
        ScenarioFailed,
        Step,
        run_scenario,
    )
    from ..simulators.terminal import describe

    # What each merchant pays the network per point issued at it, and is paid per
    # point redeemed at it (fen): clearing turns the day's points into these.
    DEMO_RATES = [("1.2", "1"), ("1", "1"), ("0.8", "1")]
    data_dir = Path(args.data_dir or "var/demo")
    if data_dir.exists() and not args.keep:
        shutil.rmtree(data_dir)
    cfg = common.config(args)
    cfg.database.dsn = None
    cfg.database.data_dir = str(data_dir)
    cfg.expiry.policy, cfg.expiry.months = "months", 24  # points earned today expire in two years
    cfg.listeners = [ListenerConfig("cup", 0, "cup", "binary2", host="127.0.0.1"),
                     ListenerConfig("iso87", 0, "iso87", "ascii4", host="127.0.0.1")]
    cfg.http.port = 0  # a free port, as the listeners: a switch running on this machine holds 8080
    logs.configure(args.log_level or "error")  # the scenario prints what happens; --log-level shows more
    print(f"starting embedded PostgreSQL in {data_dir} ...", flush=True)
    dsn, embedded = common.resolve_dsn(cfg)
    vault = common.vault(cfg, True)  # the demo's own master key, generated into its data folder
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
        inbox, hook_secrets = await demo_messages.start_inbox(cfg, [m[0] for m in DEMO_MERCHANTS])
        bank = await HostSimulator("bank", rules=[Rule(action="approve", delay_s=1.5, card=DEMO_SLOW_BANK_CARD)],
                                   ledger_file=data_dir / "bank-ledger.jsonl").start()
        insurer = await HostSimulator("insurer", ledger_file=data_dir / "insurer-ledger.jsonl").start()
        quick: dict[str, Any] = {"response_timeout_s": 1.0, "reversal_retry_s": 0.2, "backoff_initial_s": 0.1}
        cfg.connectors = [ConnectorConfig("bank", port=bank.port, **quick),
                          ConnectorConfig("insurer", port=insurer.port, **quick)]
        cfg.cash_out = UsageConfig(connector="bank", points_per_yuan="100", min_amount_fen=10)
        cfg.insurance = UsageConfig(connector="insurer", points_per_yuan="100", min_amount_fen=10)
        try:
            return await run_with_hosts(bank, insurer, inbox, hook_secrets)
        finally:
            await bank.stop()
            await insurer.stop()
            await inbox.stop()

    async def run_with_hosts(bank: HostSimulator, insurer: HostSimulator, inbox: Any,
                             hook_secrets: dict[str, str]) -> int:
        async with running_switch(cfg, dsn, vault) as running:
            tmks: dict[str, bytes] = {}
            async with running.pool.acquire() as con:
                for (mid, name, rate, tid), (price, value) in zip(DEMO_MERCHANTS, DEMO_RATES, strict=True):
                    await admin.add_merchant(con, mid, name, rate, issue_price=price, redeem_value=value)
                    added = await admin.add_terminal(con, vault, tid, mid)
                    tmks[tid] = bytes.fromhex(added["tmk"])  # "loaded into the terminal"
                await admin.add_card(con, vault, DEMO_CARD, "Li Lei", demo_messages.DEMO_PHONE, DEMO_PIN)
                await demo_messages.subscribe(con, vault, DEMO_CARD, inbox, hook_secrets)
            host, port = running.address("cup")
            for connector in running.connectors.values():
                await connector.wait_available(5)
            print(f"switch listening: cup on {host}:{port}, iso87 on {running.address('iso87')[1]};"
                  f" bank host on {bank.port}, insurer host on {insurer.port}")
            print(f"demo network: {len(DEMO_MERCHANTS)} merchants, card {DEMO_CARD[:6]}*********{DEMO_CARD[-4:]}\n")
            try:
                await run_scenario(host, port, tmks, DEMO_CARD, report=show, upstream=True, end_of_day=True)
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
                card = await admin.show_card(con, vault, DEMO_CARD, postings_limit=0)
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
            expiring = card["points_by_expiry"]["expiring"]
            if expiring:
                print("card points by expiry: " + ", ".join(f"{n} until {d}" for d, n in expiring.items()))
            print(f"card balance {card['points_balance']} points;",
                  "ledger invariants hold" if not problems else f"INVARIANTS BROKEN: {problems}")
            closed = await end_of_day(running)
            await demo_messages.print_received(running.pool, inbox)
            await show_web(running)
            return 0 if not problems and closed["sum_net_fen"] == 0 else 1

    async def show_web(running: Any) -> None:
        """Where the console, the API and the metrics are, and what Prometheus would scrape."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        host, port = running.web.bound
        base = f"http://{host}:{port}"
        async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
            text = await resp.text()
        counted: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            if family.name == "pointswitch_requests":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        key = (sample.labels.get("operation", ""), sample.labels.get("code", ""))
                        counted[key] = counted.get(key, 0) + sample.value
        print(f"\nthe web layer of this run: console {base}/console, JSON API {base}/api/v1,"
              f" metrics {base}/metrics (a console operator: pointswitch admin operator add NAME --role operator)")
        print("requests counted by /metrics (operation, code):",
              ", ".join(f"{op} {code} x{int(n)}" for (op, code), n in sorted(counted.items())))

    async def end_of_day(running: Any) -> dict[str, Any]:
        """The day ends: the business day is cut off and closed, its clearing printed."""
        from ..ledger import days
        from .days import clearing_text

        print("\nend of day: the terminals have settled; the operator closes the business day (a forced cut-off)")
        closed = await days.close_day(running.pool, running.ledger, by="demo", clearing_dir=data_dir / "clearing")
        print(clearing_text(closed.report))
        return closed.report

    try:
        return asyncio.run(run())
    finally:
        if embedded:
            embedded.stop()


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sp = sub.add_parser("demo", help="start the switch on a fresh demo network and run the scenario")
    sp.add_argument("--data-dir", help="demo database folder (default: var/demo, recreated)")
    sp.add_argument("--keep", action="store_true", help="keep an existing demo database")
    sp.add_argument("--log-level", choices=list(logs.LEVELS))
    sp.set_defaults(func=cmd_demo, config=None)
