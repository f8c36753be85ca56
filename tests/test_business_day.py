"""The business day over TCP and the operator's commands: field 15, cut-off,
closing (once, in order), clearing that sums to zero, the clearing file, a late
void after the day closed, a cut-off in the middle of traffic, the scheduler.

Each test runs a switch on a database of its own (on the shared embedded
server): closing days moves the business date, which the other tests' shared
database should not see."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pointswitch.app import Running, resolve_vault, running_switch
from pointswitch.ledger import admin, days
from pointswitch.ledger.scheduler import DayCloser
from pointswitch.simulators.terminal import TerminalClient

from .conftest import TEST_PIN, SwitchUnderTest, _test_config, fresh_database
from .test_cli import _cli

CARD = "6288770000000011"


@dataclass
class Day:
    running: Running
    dsn: str
    tmks: dict[str, bytes]
    clearing_dir: Path
    master_key_hex: str

    def terminal(self, tid: str, merchant: str) -> TerminalClient:
        return TerminalClient("127.0.0.1", self.running.address("cup")[1], tid, merchant, timeout_s=15,
                              tmk=self.tmks[tid], default_pin=TEST_PIN, sign_on_at_connect=True)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        con = await asyncpg.connect(self.dsn)
        try:
            return await con.fetch(sql, *args)
        finally:
            await con.close()

    async def open_day(self) -> date:
        return (await self.fetch("SELECT greatest(business_date_at(now(), cutoff, time_zone), cut_through + 1) AS d"
                                 " FROM business_calendar"))[0]["d"]

    def cli(self, *args: str, check: bool = True) -> Any:
        env = {"POINTSWITCH_MASTER_KEY": self.master_key_hex, "POINTSWITCH_DAY_CLEARING_DIR": str(self.clearing_dir)}
        return _cli("admin", *args, "--dsn", self.dsn, env=env, check=check)


@contextlib.asynccontextmanager
async def day_switch(sut: SwitchUnderTest, tmp_path: Path) -> AsyncIterator[Day]:
    """A switch on a fresh database with merchants A (issues: terminals TDA00001-3)
    and B (redeems: TDB00001), and one card."""
    dsn = await fresh_database(sut, "days")
    cfg = _test_config()
    cfg.database.data_dir = str(sut.data_dir)
    cfg.day.clearing_dir = str(tmp_path / "clearing")
    vault = resolve_vault(cfg, embedded=True, env={})  # the same master key; a vault serves one database
    async with running_switch(cfg, dsn, vault) as running:
        tmks = {}
        async with running.pool.acquire() as c:
            await admin.add_merchant(c, "MA0000000000001", "Issuing shop", "1", issue_price="0.5")
            await admin.add_merchant(c, "MB0000000000002", "Redeeming shop", "1", redeem_value="2")
            for tid, mid in (("TDA00001", "MA0000000000001"), ("TDA00002", "MA0000000000001"),
                             ("TDA00003", "MA0000000000001"), ("TDB00001", "MB0000000000002")):
                tmks[tid] = bytes.fromhex((await admin.add_terminal(c, vault, tid, mid))["tmk"])
            await admin.add_card(c, vault, CARD, "Day Member", "13800000000", pin=TEST_PIN)
        yield Day(running, dsn, tmks, Path(cfg.day.clearing_dir), sut.master_key_hex)


def _mmdd(d: date) -> str:
    return f"{d:%m%d}"


def _position(report: dict[str, Any], party: str) -> dict[str, Any]:
    return next(p for p in report["positions"] if p["party"] == party)


async def test_a_day_closes_once_clears_to_zero_and_a_late_void_lands_on_the_next_day(switch, tmp_path):
    async with day_switch(switch, tmp_path) as day:
        d1 = await day.open_day()
        async with day.terminal("TDA00001", "MA0000000000001") as a, day.terminal("TDB00001", "MB0000000000002") as b:
            accrual = await a.accrue(CARD, 30000)  # 300 yuan at 1 point per yuan: 300 points
            assert accrual.approved and accrual.fields["15"] == _mmdd(d1)
            redeemed = await b.redeem(CARD, 200)  # 2 yuan at 2 fen per point: 100 points
            assert redeemed.approved and redeemed.fields["15"] == _mmdd(d1)
            second_accrual = await a.accrue(CARD, 5000)  # 50 points
            assert second_accrual.approved

            closed = json.loads(day.cli("day", "close", "--json").stdout)  # forced: the open day, now
            assert closed["business_date"] == d1.isoformat() and closed["changed"] and closed["forced"]
            a_pos, b_pos = _position(closed, "MA0000000000001"), _position(closed, "MB0000000000002")
            assert (a_pos["points_issued"], a_pos["issue_fee_fen"], a_pos["net_fen"]) == (350, 175, -175)
            assert (b_pos["points_redeemed"], b_pos["redeem_value_fen"], b_pos["net_fen"]) == (100, 200, 200)
            assert _position(closed, "network")["net_fen"] == -25
            assert closed["sum_net_fen"] == 0 == sum(p["net_fen"] for p in closed["positions"])
            assert closed["points_outstanding"] == 250 and closed["postings"] == 3

            # The file: one line per party, a header, a totals line; the same figures as the JSON.
            path = day.clearing_dir / f"clearing-{d1:%Y%m%d}.csv"
            rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
            assert [r["party"] for r in rows] == [p["party"] for p in closed["positions"]] + ["TOTAL"]
            for r, p in zip(rows, closed["positions"], strict=False):
                assert (int(r["points_issued"]), int(r["points_redeemed"]), int(r["net_fen"])) == (
                    p["points_issued"], p["points_redeemed"], p["net_fen"])
            assert rows[-1]["net_fen"] == "0"
            assert day.cli("clearing", "show", d1.isoformat(), "--csv").stdout == path.read_text(encoding="utf-8")
            shown = json.loads(day.cli("clearing", "show", d1.isoformat(), "--json").stdout)
            assert shown["positions"] == closed["positions"] and shown["sum_net_fen"] == 0

            # Closing the same day again changes nothing and says so.
            again = day.cli("day", "close", d1.isoformat())
            assert "already closed" in again.stdout and "nothing changed" in again.stdout
            assert json.loads(day.cli("day", "close", d1.isoformat(), "--json").stdout)["changed"] is False

            # The next day opened at once; a void of the closed day's accrual (same batch)
            # is posted on it, linked to the original; the closed day does not change.
            d2 = await day.open_day()
            assert d2 == d1 + timedelta(days=1)
            void = await a.void(second_accrual)
            assert void.approved and void.fields["15"] == _mmdd(d2)
            rows2 = await day.fetch("SELECT p.business_date, r.original_request_id IS NOT NULL AS linked"
                                    " FROM postings p JOIN requests r USING (request_id) WHERE r.operation = $1",
                                    "void_accrual")
            assert [(r["business_date"], r["linked"]) for r in rows2] == [(d2, True)]
            assert day.cli("day", "verify").returncode == 0
            assert json.loads(day.cli("clearing", "show", d1.isoformat(), "--json").stdout)["positions"] == \
                closed["positions"]
        second = json.loads(day.cli("day", "close", "--json").stdout)
        assert _position(second, "MA0000000000001")["points_issued"] == -50  # the void, net
        assert second["sum_net_fen"] == 0 and second["points_outstanding"] == 200
        async with day.running.pool.acquire() as con:
            assert await admin.check_invariants(con) == []


async def test_days_close_in_order_and_never_before_they_begin(switch, tmp_path):
    async with day_switch(switch, tmp_path) as day:
        d1 = await day.open_day()
        refused = day.cli("day", "close", (d1 + timedelta(days=1)).isoformat(), check=False)
        assert refused.returncode == 1 and "has not begun" in refused.stderr
        # The network existed the day before, and that day was never closed.
        async with day.running.pool.acquire() as con:
            await con.execute("UPDATE business_calendar SET first_day = first_day - 1")
        refused = day.cli("day", "close", check=False)
        assert refused.returncode == 1 and f"close business day {d1 - timedelta(days=1)} first" in refused.stderr
        assert await day.fetch("SELECT * FROM business_days") == []  # nothing was cut off
        assert json.loads(day.cli("day", "close", (d1 - timedelta(days=1)).isoformat(), "--json").stdout)["changed"]
        assert json.loads(day.cli("day", "close", d1.isoformat(), "--json").stdout)["changed"]
        listing = json.loads(day.cli("day", "list", "--json").stdout)
        assert listing["open_day"] == (d1 + timedelta(days=1)).isoformat()
        assert [d["business_date"] for d in listing["days"]] == [d1.isoformat(), (d1 - timedelta(days=1)).isoformat()]


async def test_a_cut_off_in_the_middle_of_traffic_puts_every_posting_on_the_day_its_answer_named(switch, tmp_path):
    """No posting joins a day after its cut-off, and the 15 of every answer is the day
    the posting was booked on: the close waits for the postings in flight."""
    async with day_switch(switch, tmp_path) as day:
        d1 = await day.open_day()
        answers: list[str] = []
        done, enough, wanted = asyncio.Event(), asyncio.Event(), [10]

        async def traffic(tid: str) -> None:
            async with day.terminal(tid, "MA0000000000001") as t:
                while not done.is_set():
                    reply = await t.accrue(CARD, 100)
                    assert reply.approved
                    answers.append(reply.fields["15"])
                    if len(answers) >= wanted[0]:
                        enough.set()

        flows = [asyncio.create_task(traffic(f"TDA0000{i}")) for i in (1, 2, 3)]
        await enough.wait()
        closed = await days.close_day(day.running.pool, day.running.ledger, clearing_dir=day.clearing_dir)
        enough.clear()
        wanted[0] = len(answers) + 10
        await enough.wait()
        done.set()
        await asyncio.gather(*flows)
        on_d1 = answers.count(_mmdd(d1))
        assert 0 < on_d1 < len(answers) and set(answers) == {_mmdd(d1), _mmdd(d1 + timedelta(days=1))}
        assert _position(closed.report, "MA0000000000001")["points_issued"] == on_d1
        counted = await day.fetch("SELECT business_date, count(*) AS n FROM postings GROUP BY 1 ORDER BY 1")
        assert [(r["business_date"], r["n"]) for r in counted] == [
            (d1, on_d1), (d1 + timedelta(days=1), len(answers) - on_d1)]


async def test_the_journal_is_append_only_and_a_changed_closed_day_is_found(switch, tmp_path):
    async with day_switch(switch, tmp_path) as day:
        async with day.terminal("TDA00001", "MA0000000000001") as a:
            assert (await a.accrue(CARD, 500)).approved
        d1 = (await days.close_day(day.running.pool, day.running.ledger)).report["business_date"]
        async with day.running.pool.acquire() as con:
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await con.execute("UPDATE postings SET amount_points = amount_points + 1")
            assert await days.verify_days(con) == []
            # A posting slipped into the closed day behind the ledger's back is seen.
            await con.execute(
                "INSERT INTO postings (request_id, reason, debit_account_id, credit_account_id, amount_points,"
                " business_date) SELECT request_id, 'forged', debit_account_id, credit_account_id, 1, $1"
                " FROM postings LIMIT 1", date.fromisoformat(d1))
            assert [f"closed business day {d1} changed" in p for p in await days.verify_days(con)] == [True]
            assert any("changed" in p for p in await admin.check_invariants(con))


async def test_what_the_journal_refers_to_is_never_deleted_and_an_orphan_is_found(switch, tmp_path):
    """Decision 51: no per-row foreign keys from the journal; parents that can never go
    away instead, and `admin check` looking for orphans."""
    async with day_switch(switch, tmp_path) as day:
        async with day.terminal("TDA00001", "MA0000000000001") as a:
            assert (await a.accrue(CARD, 500)).approved
        async with day.running.pool.acquire() as con:
            for sql in ("DELETE FROM accounts", "DELETE FROM requests", "DELETE FROM cards",
                        "DELETE FROM point_lots", "TRUNCATE accounts CASCADE", "TRUNCATE postings",
                        "UPDATE accounts SET account_id = account_id + 1000",
                        "UPDATE requests SET request_id = request_id + 1000"):
                with pytest.raises(asyncpg.PostgresError, match="never deleted|append-only"):
                    await con.execute(sql)
            assert await admin.check_invariants(con) == []
            # What a foreign key would have refused, written behind the ledger's back, is found.
            await con.execute(
                "INSERT INTO postings (request_id, reason, debit_account_id, credit_account_id, amount_points)"
                " SELECT request_id, 'orphan', debit_account_id, -1, 1 FROM postings LIMIT 1")
            await con.execute(
                "INSERT INTO point_lots (card_index, origin, earned_on, points_earned, points_left, request_id)"
                " VALUES (repeat('e', 64), 'opening', current_date, 0, 0, -5)")
            problems = await admin.check_invariants(con)
            assert "1 postings naming no account" in problems
            assert "1 lots of no card or request" in problems


async def test_the_scheduler_closes_the_days_whose_cut_off_and_grace_have_passed(switch, tmp_path):
    async with day_switch(switch, tmp_path) as day:
        d1 = await day.open_day()
        async with day.terminal("TDA00001", "MA0000000000001") as a:
            assert (await a.accrue(CARD, 700)).approved
        # The network began two days ago: those two days have ended, the open one has not.
        async with day.running.pool.acquire() as con:
            await con.execute("UPDATE business_calendar SET first_day = first_day - 2")
        patient = DayCloser(day.running.pool, day.running.ledger, grace_s=3 * 86400, interval_s=1,
                            clearing_dir=day.clearing_dir)
        assert await patient.run_once() == []  # within the grace period: nothing is due
        closer = DayCloser(day.running.pool, day.running.ledger, grace_s=0, interval_s=1,
                           clearing_dir=day.clearing_dir)
        before = [d1 - timedelta(days=2), d1 - timedelta(days=1)]
        assert await closer.run_once() == [d.isoformat() for d in before]
        assert all((day.clearing_dir / f"clearing-{d:%Y%m%d}.csv").exists() for d in before)
        rows = await day.fetch("SELECT business_date, closed_by, forced, postings_count FROM business_days ORDER BY 1")
        assert [tuple(r) for r in rows] == [(d, "scheduler", False, 0) for d in before]
        assert await closer.run_once() == []
        assert await day.open_day() == d1  # the open day goes on


async def test_a_batch_that_spans_two_days_settles_on_the_day_it_is_settled(switch, tmp_path):
    async with day_switch(switch, tmp_path) as day:
        d1 = await day.open_day()
        async with day.terminal("TDA00001", "MA0000000000001") as a:
            first = await a.accrue(CARD, 1000)
            assert first.approved and first.fields["15"] == _mmdd(d1)
            await days.close_day(day.running.pool, day.running.ledger)  # midnight passes mid-batch
            second = await a.accrue(CARD, 2000)
            assert second.approved and second.fields["15"] == _mmdd(d1 + timedelta(days=1))
            settled = await a.settle()
            assert settled.approved and settled.fields["15"] == _mmdd(d1 + timedelta(days=1))
            assert settled.fields["48"][:31] == "000000003000" "002" "000000000000" "000" "1"  # both days, agreed
            assert (await a.void(first)).rc == "77"  # the batch is closed
        rows = await day.fetch("SELECT business_date, agree FROM batch_settlements WHERE terminal_id = 'TDA00001'")
        assert [tuple(r) for r in rows] == [(d1 + timedelta(days=1), True)]


async def test_closing_a_day_expires_the_points_due_and_books_the_breakage_on_it(switch, tmp_path):
    async with day_switch(switch, tmp_path) as day:
        d1 = await day.open_day()
        async with day.terminal("TDA00001", "MA0000000000001") as a, day.terminal("TDB00001", "MB0000000000002") as b:
            old = await a.accrue(CARD, 30000)  # 300 points ...
            assert (await a.accrue(CARD, 5000)).approved  # ... and 50 that never expire
            async with day.running.pool.acquire() as con:  # the 300 were earned long ago: due today
                await con.execute("UPDATE point_lots SET expires_on = $1 WHERE request_id ="
                                  " (SELECT request_id FROM requests WHERE rrn = $2)", d1, old.fields["37"])
            assert (await b.redeem(CARD, 200)).approved  # 100 points, taken from the lot that expires first
        closed = json.loads(day.cli("day", "close", "--json").stdout)
        assert (closed["points_expired"], closed["cards_expired"], closed["points_outstanding"]) == (200, 1, 50)
        assert closed["sum_net_fen"] == 0
        card = json.loads(day.cli("card", "show", CARD, "--json").stdout)
        assert card["points_balance"] == 50
        assert card["points_by_expiry"] == {"expiring": {}, "never_expiring": 50}
        expired = await day.fetch(
            "SELECT p.business_date, p.amount_points FROM postings p JOIN accounts a ON a.account_id ="
            " p.credit_account_id WHERE a.kind = 'operator' AND a.owner = 'expired'")
        assert [tuple(r) for r in expired] == [(d1, 200)]  # breakage, on the day closed
        again = json.loads(day.cli("day", "close", d1.isoformat(), "--json").stdout)
        assert again["changed"] is False and again["points_expired"] == 200  # nothing expires twice
        async with day.running.pool.acquire() as con:
            assert await admin.check_invariants(con) == []


async def test_a_cut_off_waits_for_a_posting_that_took_the_day_before_it(switch, tmp_path):
    """A posting that took its business date and is still writing (here: waiting for its
    card's row) holds the cut-off: the day is cleared with it, never without it and then
    changed by it."""
    async with day_switch(switch, tmp_path) as day:
        d1 = await day.open_day()
        async with day.terminal("TDA00001", "MA0000000000001") as a:
            blocker = await asyncpg.connect(day.dsn)
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM cards FOR UPDATE")
            try:
                accrual = asyncio.create_task(a.accrue(CARD, 1000))
                await asyncio.sleep(0.5)  # it has its business date and waits for the card
                closing = asyncio.create_task(days.close_day(day.running.pool, day.running.ledger))
                await asyncio.sleep(0.5)
                assert not closing.done(), "the cut-off waits for the posting in flight"
            finally:
                await tx.rollback()
                await blocker.close()
            reply, closed = await accrual, await closing
        assert reply.approved and reply.fields["15"] == _mmdd(d1)
        assert _position(closed.report, "MA0000000000001")["points_issued"] == 10
        async with day.running.pool.acquire() as con:
            assert await days.verify_days(con) == []
