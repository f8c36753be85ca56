#!/usr/bin/env python3
"""What closing a business day costs: cut-off, expiry, clearing, file, verification.

    python3 dev.py close-bench                          # 1,000,000 postings on one day
    .venv/bin/python bench/close_day.py --postings 200000 --merchants 20 --json

One run:

1. a temporary folder with a fresh embedded PostgreSQL server, migrated;
2. merchants and cards (``admin`` functions), then a day of journal written in bulk
   by SQL (accruals 80 %, redemptions 20 %, over all merchants and cards), with the
   card balances that journal gives (and their points lots, when the schema has them);
3. ``close_day`` on that day, timed per step (the report keeps the timings), the
   clearing file written, then ``verify_days`` (the checksum of every closed day);
4. a report (``--json``: also one JSON object on stdout).

The journal is written by SQL rather than through the switch, to measure the close
alone: the switch's own rate is ``bench/throughput.py``'s business.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from measure import machine  # noqa: E402 - bench/ is scripts, not a package


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--postings", type=int, default=1_000_000, help="postings on the day closed (default 1,000,000)")
    p.add_argument("--merchants", type=int, default=50, help="merchants (default 50)")
    p.add_argument("--cards", type=int, default=100_000, help="cards (default 100,000)")
    p.add_argument("--expiring", type=float, default=0.1,
                   help="share of the cards whose points lot is due on the day closed (default 0.1)")
    p.add_argument("--json", action="store_true", help="also print the report as one JSON object on stdout")
    return p


_CHUNK = 100_000

_JOURNAL = """
INSERT INTO requests (request_key, operation, state, status, terminal_id, merchant_id, card_index,
                      amount_fen, points, batch, trace, outcome, business_date)
SELECT 'bench:' || g, CASE WHEN g % 5 = 0 THEN 'redeem' ELSE 'accrue' END, 'approved', 'approved',
       'BENCH' || lpad((g % $2)::text, 3, '0'), 'BM' || lpad((g % $2)::text, 13, '0'),
       c.card_index, 1000, 10, 1, g % 1000000, '{}'::jsonb, $3
FROM generate_series($5::bigint, $1) g
JOIN (SELECT card_index, row_number() OVER (ORDER BY card_index) - 1 AS n FROM cards) c ON c.n = (g / 5) % $4
"""

_POSTINGS = """
INSERT INTO postings (request_id, reason, debit_account_id, credit_account_id, amount_points, business_date)
SELECT r.request_id, r.operation,
       CASE WHEN r.operation = 'accrue' THEN m.issued_account_id ELSE c.account_id END,
       CASE WHEN r.operation = 'accrue' THEN c.account_id ELSE m.redeemed_account_id END,
       r.points, r.business_date
FROM requests r JOIN merchants m USING (merchant_id) JOIN cards c USING (card_index)
WHERE r.request_key LIKE 'bench:%'
"""

_BALANCES = """
WITH moves AS (SELECT credit_account_id AS account_id, amount_points AS points FROM postings
               UNION ALL SELECT debit_account_id, -amount_points FROM postings),
     balances AS (SELECT account_id, sum(points) AS balance FROM moves GROUP BY account_id)
UPDATE cards c SET points_balance = b.balance FROM balances b WHERE b.account_id = c.account_id
"""


async def seed(pool: Any, vault: Any, args: argparse.Namespace) -> Any:
    from pointswitch.ledger import admin, days

    async with pool.acquire() as con:
        day = (await days.calendar(con)).open_day
        for i in range(args.merchants):
            await admin.add_merchant(con, f"BM{i:013d}", f"Bench merchant {i}", "1", issue_price="0.8",
                                     redeem_value="1")
        await admin.add_cards_in_bulk(con, vault, 6288000000000000, args.cards, "123456")
        started = time.monotonic()
        for first in range(1, args.postings + 1, _CHUNK):
            last = min(first + _CHUNK - 1, args.postings)
            await con.execute(_JOURNAL, last, args.merchants, day, args.cards, first)
        await con.execute(_POSTINGS)
        await con.execute(_BALANCES)
        lots = await con.fetchval("SELECT to_regclass('point_lots') IS NOT NULL")
        if lots:  # the points lots the journal implies: one per card, a share of them due on the day
            # the bench replaces the lots the seed made; the switch never deletes one (triggers refuse it)
            await con.execute("SET session_replication_role = replica")
            await con.execute("DELETE FROM point_lots")
            await con.execute("SET session_replication_role = DEFAULT")
            await con.execute(
                "INSERT INTO point_lots (card_index, origin, earned_on, expires_on, points_earned, points_left)"
                " SELECT c.card_index, 'opening', $1::date, CASE WHEN random() < $2 THEN $1::date END,"
                " c.points_balance, c.points_balance FROM cards c WHERE c.points_balance > 0",
                day, args.expiring)
        await con.execute("ANALYZE")
        say(f"journal written: {args.postings:,} postings in {time.monotonic() - started:.1f} s")
        return day, bool(lots)


async def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from pointswitch.app import database, resolve_vault
    from pointswitch.config import Config
    from pointswitch.ledger import Ledger, days
    from pointswitch.ledger.database import EmbeddedServer

    cfg = Config()
    cfg.database.data_dir = str(folder)
    cfg.database.command_timeout_s = 3600.0  # writing the journal in bulk takes minutes
    server = EmbeddedServer(folder)
    dsn = server.start()
    try:
        vault = resolve_vault(cfg, embedded=True, env={})
        async with database(cfg, dsn, vault) as pool:
            day, lots = await seed(pool, vault, args)
            ledger = Ledger(pool, vault, pin_workers=1)
            try:
                rss_before = psutil.Process().memory_info().rss
                started = time.monotonic()
                closed = await days.close_day(pool, ledger, day, clearing_dir=folder / "clearing")
                total_s = time.monotonic() - started
                started = time.monotonic()
                async with pool.acquire() as con:
                    problems = await days.verify_days(con)
                verify_s = time.monotonic() - started
            finally:
                ledger.close()
            size = await pool.fetchval("SELECT pg_size_pretty(pg_total_relation_size('postings'))")
    finally:
        server.stop()
    report = closed.report
    return {
        "postings": report["postings"], "merchants": args.merchants, "cards": args.cards, "lots": lots,
        "points_expired": report["points_expired"], "cards_expired": report["cards_expired"],
        "sum_net_fen": report["sum_net_fen"], "timings_ms": report["timings_ms"],
        "close_s": round(total_s, 2), "verify_s": round(verify_s, 2), "verify_problems": problems,
        "postings_per_s": round(report["postings"] / total_s), "postings_table": size,
        "bench_rss_mib_delta": round((psutil.Process().memory_info().rss - rss_before) / 2**20, 1),
        "machine": machine(),
    }


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM too: the PostgreSQL server and the folder are removed on the way out


def main() -> int:
    args = build_parser().parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    folder = Path(tempfile.mkdtemp(prefix="pointswitch-close-"))
    try:
        result = asyncio.run(measure(args, folder))
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    t = result["timings_ms"]
    say(f"closed a day of {result['postings']:,} postings ({result['merchants']} merchants, {result['cards']:,}"
        f" cards) in {result['close_s']} s: cut-off {t['cut_off']} ms, expiry {t['expiry']} ms"
        f" ({result['points_expired']:,} points on {result['cards_expired']:,} cards), clearing and checksum"
        f" {t['clearing']} ms; {result['postings_per_s']:,} postings/s; verify {result['verify_s']} s;"
        f" sum {result['sum_net_fen']} fen; postings table {result['postings_table']}")
    say(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores")
    if args.json:
        print(json.dumps(result))
    return 0 if result["sum_net_fen"] == 0 and not result["verify_problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
