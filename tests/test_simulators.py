"""The simulators as a fault campaign uses them, over real TCP against the real switch:
terminals that reverse what goes unanswered and keep a journal of what they saw, a
bank whose ledger file survives its restarts, and connector state that does not
report an error from a past outage."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from pointswitch.cli.admin import _connectors_text
from pointswitch.codecs import FrameDecoder, dialect, framing
from pointswitch.ledger import admin
from pointswitch.simulators import host_ledger
from pointswitch.simulators.host import HostSimulator
from pointswitch.simulators.journal import KEYS, TerminalJournal, journal_line, read_journal
from pointswitch.simulators.load import LoadPlan, run_load
from pointswitch.simulators.reply import Reply
from pointswitch.simulators.terminal import NoAnswer

from .conftest import Network, SwitchUnderTest, make_network
from .test_upstream import BANK_CARD, World, _terminal, upstream_switch

PS = [sys.executable, "-m", "pointswitch"]


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 8.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class _Stall:
    """Another session holding locks: a database stalled, as far as those go. By default
    the card's row; with ``requests`` the requests table too, against inserts (so that
    a reversal stalls as well)."""

    def __init__(self, net: Network, card: str, *, requests: bool = False):
        self.net, self.card, self.requests = net, card, requests

    async def __aenter__(self) -> _Stall:
        self.con = await asyncpg.connect(self.net.dsn)
        self.tx = self.con.transaction()
        await self.tx.start()
        await self.con.execute("SELECT 1 FROM cards WHERE card_index = $1 FOR UPDATE", self.net.card_index(self.card))
        if self.requests:
            await self.con.execute("LOCK TABLE requests IN SHARE ROW EXCLUSIVE MODE")
        return self

    async def waited_on(self) -> bool:
        """Some session is waiting for a lock (the switch, on this card's row)."""
        return bool(await self.con.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"))

    async def release(self) -> None:
        if not self.con.is_closed():
            await self.tx.rollback()
            await self.con.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


# -- 1. terminal practice: reversal on timeout, and the journal ------------------------------------------
def test_journal_lines_say_exactly_what_the_terminal_saw(tmp_path: Path):
    card = "6288880000000000017"
    request = {"t": "0200", "2": card, "3": "000000", "4": "000000001250", "11": "000042", "25": "00",
               "41": "T0000001", "42": "M00000000000001", "52": "00FF", "60": "22000007", "64": "AB"}
    approved = Reply(request, {"t": "0210", "39": "00", "37": "000000000123", "38": "406149", "63": "12"})
    declined = Reply(request | {"11": "000043"}, {"t": "0210", "39": "51", "37": "000000000124"})
    reversal = Reply({**request, "t": "0400"}, {"t": "0410", "39": "00"})
    at = datetime(2026, 11, 25, 6, 45, 35, 123000, tzinfo=UTC)
    with TerminalJournal(tmp_path / "t.jsonl") as journal:
        journal.write(journal_line("T0000001", "M00000000000001", request, approved, at=at))
        journal.record("T0000001", "M00000000000001", declined.request, declined)
        journal.record("T0000001", "M00000000000001", request | {"11": "000044"}, None, reversal=reversal,
                       reversal_attempts=2)
        journal.record("T0000001", "M00000000000001", request | {"11": "000045"}, None, reversal_attempts=3)
        journal.record("T0000001", "M00000000000001", request | {"11": "000046"}, None)
        journal.record("T0000001", "M00000000000001", {**request, "t": "0400", "39": "98"}, reversal)
        written = read_journal(tmp_path / "t.jsonl")  # flushed line by line: readable before close
    assert written[0] == {
        "at": "2026-11-25T06:45:35.123+00:00", "terminal": "T0000001", "merchant": "M00000000000001",
        "mti": "0200", "operation": "accrue", "trace": "000042", "batch": "000007", "card": "628888*********0017",
        "amount_fen": 1250, "rc": "00", "rrn": "000000000123", "auth_code": "406149", "points_moved": 12,
        "reversal_rc": None, "reversal_attempts": 0,
    }
    assert all(tuple(line) == KEYS for line in written), "every line has the same keys, in the same order"
    outcomes = [(w["trace"], w["rc"], w["points_moved"], w["reversal_rc"], w["reversal_attempts"]) for w in written]
    assert outcomes == [("000042", "00", 12, None, 0), ("000043", "51", None, None, 0),
                        ("000044", "no answer", None, "00", 2), ("000045", "no answer", None, "no answer", 3),
                        ("000046", "no answer", None, None, 0), ("000042", "00", None, None, 0)]
    assert [(w["mti"], w["operation"]) for w in written][-1] == ("0400", "accrue"), "a reversal names what it undoes"
    assert card not in (tmp_path / "t.jsonl").read_text(), "no card number in clear"


async def test_an_unanswered_accrual_is_reversed_until_answered_and_the_balance_is_unchanged(
        switch: SwitchUnderTest, network: Network, tmp_path: Path):
    card = network.cards[0]
    term = network.terminal(0)
    term.timeout_s, term.reversal_on_timeout, term.reversal_attempts, term.reversal_delay_s = 0.4, True, 20, 0.2
    term.journal = TerminalJournal(tmp_path / "terminal.jsonl")
    async with term, _Stall(network, card, requests=True) as lock:
        accrual = asyncio.create_task(term.accrue(card, 5000))
        await _until(lock.waited_on, what="the accrual to stall")
        await asyncio.sleep(1.0)  # the terminal gave up on it, and its reversals stall too
        await lock.release()
        try:
            await accrual
            raise AssertionError("answered, although the database stalled past the terminal's timeout")
        except NoAnswer as unanswered:
            outcome = unanswered
        await asyncio.sleep(0.3)  # the switch finishes what the terminal stopped waiting for
        after = await term.accrue(card, 100)  # the terminal carries on
    term.journal.close()
    assert outcome.reversal is not None and outcome.reversal.rc == "00", "the reversal is answered 00"
    assert outcome.reversal_attempts >= 2, "the reversal stalled as well and was sent again"
    assert outcome.reversal.request["t"] == "0400" and outcome.reversal.request["39"] == "98"
    assert "52" not in outcome.reversal.request and outcome.reversal.mac_ok is True
    assert after.rc == "00" and after.points_balance == 1, "nothing of the 5000 fen accrual stayed posted"
    assert await network.balance(card) == 1
    lines = read_journal(tmp_path / "terminal.jsonl")
    assert [(e["operation"], e["rc"], e["reversal_rc"]) for e in lines] == [
        ("sign_on", "00", None), ("accrue", "no answer", "00"), ("accrue", "00", None)]
    assert lines[1]["trace"] == outcome.request["11"] and lines[1]["amount_fen"] == 5000
    assert lines[1]["reversal_attempts"] == outcome.reversal_attempts


async def test_load_counts_what_each_terminal_saw_and_its_journal_reconciles_with_the_ledger(
        switch: SwitchUnderTest, network: Network, tmp_path: Path):
    card, tid = network.cards[0], network.terminal_ids[1]
    journal = tmp_path / "load.jsonl"
    plan = LoadPlan("127.0.0.1", switch.ports["cup"], network.merchant_id, terminal_prefix=tid[:6], connections=1,
                    duration_s=None, count=4, first_card=int(card), cards=1, mix={"accrue": 1}, seed=7,
                    timeout_s=0.4, tmk=network.tmks[tid], reversal_attempts=20, reversal_delay_s=0.2,
                    journal=journal)
    async with _Stall(network, card) as lock:
        load = asyncio.create_task(run_load(plan, progress=None))

        async def reversed_one() -> bool:
            return journal.exists() and '"no answer"' in journal.read_text()

        await _until(reversed_one, what="the first accrual to go unanswered and be reversed")
        await lock.release()  # the next accrual, stalled a moment, is answered
        report = await load
    await asyncio.sleep(0.3)
    seen = {"approved": 3, "declined": 0, "unanswered": 1, "reversal_answered": 1, "reversal_unanswered": 0}
    assert report.as_dict()["terminals"] == {tid: seen}
    assert report.as_dict()["outcomes"] == seen
    assert "unanswered 1 (reversed: answered 1, unanswered 0)" in report.render()
    lines = read_journal(journal)
    assert [(e["operation"], e["rc"], e["reversal_rc"]) for e in lines] == [
        ("sign_on", "00", None), ("accrue", "no answer", "00"), ("accrue", "00", None), ("accrue", "00", None),
        ("accrue", "00", None)]
    assert all(e["terminal"] == tid for e in lines) and card not in journal.read_text()
    # The reconciliation: what the terminal saw approved is what the ledger holds.
    assert await network.balance(card) == sum(e["points_moved"] for e in lines if e["rc"] == "00" and e["amount_fen"])


async def test_a_load_process_drives_the_terminals_it_is_given(switch: SwitchUnderTest, network: Network):
    """``--first-terminal``: several load processes share a network's terminals without
    two of them driving the same one (bench/throughput.py --load-processes)."""
    card, tid = network.cards[0], network.terminal_ids[0]
    plan = LoadPlan("127.0.0.1", switch.ports["cup"], network.merchant_id, terminal_prefix=tid[:6],
                    first_terminal=int(tid[6:]), connections=1, duration_s=None, count=3, first_card=int(card),
                    cards=1, mix={"accrue": 1}, tmk=network.tmks[tid])
    report = (await run_load(plan, progress=None)).as_dict()
    assert list(report["terminals"]) == [tid] and report["response_codes"] == {"00": 3}


async def test_sim_terminal_reverses_what_goes_unanswered_unless_told_not_to(
        switch: SwitchUnderTest, network: Network, tmp_path: Path):
    card, tid = network.cards[1], network.terminal_ids[0]
    journal = tmp_path / "cli.jsonl"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    common = ["--port", str(switch.ports["cup"]), "--terminal", tid, "--merchant", network.merchant_id,
              "--journal", str(journal), "--json"]

    async def sim(*args: str) -> tuple[int, dict]:
        proc = await asyncio.create_subprocess_exec(*PS, "sim", "terminal", *args, *common, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert out, err.decode()
        return proc.returncode or 0, json.loads(out)

    assert (await sim("sign-on", "--tmk", network.tmks[tid].hex()))[1]["rc"] == "00"
    async with _Stall(network, card) as lock:
        reversed_ = asyncio.create_task(sim("accrue", "--card", card, "--amount", "30", "--timeout", "0.5",
                                            "--reversal-attempts", "30", "--reversal-delay", "0.2"))
        await _until(lock.waited_on, timeout_s=30, what="the accrual to stall")
        await asyncio.sleep(1.2)
        await lock.release()
        code, result = await reversed_
    assert code == 1
    assert (result["rc"], result["reversal_rc"], result["amount_fen"]) == ("no answer", "00", 3000)
    await asyncio.sleep(0.3)
    assert await network.balance(card) == 0
    async with _Stall(network, card) as lock:
        code, bare = await sim("accrue", "--card", card, "--amount", "40", "--timeout", "0.5",
                               "--no-reversal-on-timeout")
    assert (code, bare["rc"], bare["reversal_rc"], bare["reversal_attempts"]) == (1, "no answer", None, 0)
    lines = read_journal(journal)
    assert [(e["mti"], e["operation"], e["rc"], e["reversal_rc"]) for e in lines] == [
        ("0800", "sign_on", "00", None), ("0200", "accrue", "no answer", "00"),
        ("0200", "accrue", "no answer", None)]
    assert int(lines[2]["trace"]) == int(lines[1]["trace"]) + 1, "the trace of an unanswered request is used up"
    assert card not in journal.read_text()


# -- 2. the bank's ledger on disk ----------------------------------------------------------------------
async def _ask_host(port: int, fields: dict[str, str]) -> dict[str, str]:
    """One iso87 request to a host simulator over TCP, and its answer."""
    codec, spec = dialect("iso87"), framing("ascii4")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(spec.frame(codec.encode(fields)))
        decoder = FrameDecoder(spec, 8192)
        while True:
            frames = decoder.feed(await asyncio.wait_for(reader.read(4096), 5))
            if frames:
                return codec.decode(frames[0]).fields
    finally:
        writer.close()


def _upstream(mti: str, rrn: str, trace: str) -> dict[str, str]:
    return {"t": mti, "2": BANK_CARD, "3": "260000", "4": "000000000700", "7": "1125064535", "11": trace,
            "32": "88880000001", "37": rrn, "41": "T0000001", "42": "M00000000000001", "49": "156"}


async def test_the_bank_ledger_file_survives_a_restart_and_a_reversal_undoes_the_credit_once(
        switch: SwitchUnderTest, tmp_path: Path):
    ledger = tmp_path / "bank.jsonl"
    net = await make_network(switch, terminals=1, cards=1, earn_rate="100")
    card = net.cards[0]
    bank = await HostSimulator("bank", ledger_file=ledger).start()
    insurer = await HostSimulator("insurer").start()
    try:
        async with upstream_switch(switch, bank, insurer) as running:
            w = World(switch, bank, insurer, net, running)
            await w.earn(card, 1000)
            async with _terminal(net, 0, running) as term:
                approved = await term.cash_out(card, 400, BANK_CARD)
                await bank.stop()  # the bank goes down; its memory goes with it
                restarted = await HostSimulator("bank", port=bank.port, ledger_file=ledger).start()
                w.bank = restarted
                assert (restarted.replayed, restarted.net_fen()) == (1, 400), "the credit is known again"
                assert await running.connectors["bank"].wait_available(5)
                reversed_ = await term.reverse(approved.request)
            rows = await w.drained()
            assert await w.paid_out_fen() == 0 == host_ledger.net_credited_fen(ledger)
        upstream_rrn = bank.requests("0200")[0]["37"]
        repeat = await _ask_host(restarted.port, _upstream("0420", upstream_rrn, "000001"))
        unknown = await _ask_host(restarted.port, _upstream("0400", "999000000001", "000002"))
        await restarted.stop()
        again = await HostSimulator("bank", ledger_file=ledger).start()  # and once more, elsewhere
        try:
            late = await _ask_host(again.port, _upstream("0200", "999000000001", "000003"))
        finally:
            await again.stop()
    finally:
        await bank.stop()
        await insurer.stop()
    assert (approved.rc, reversed_.rc) == ("00", "00")
    assert [(r["reason"], r["state"], r["upstream_rc"]) for r in rows] == [
        ("terminal_reversal", "acknowledged", "00")], "acknowledged by the bank that restarted"
    assert await net.balance(card) == 1000
    assert repeat["39"] == "00", "a repeat of a reversal carried out is answered 00 again"
    assert unknown["39"] == "25", "a reversal of a credit never made: original not found"
    assert late["39"] == "05", "the late original of a reference reversed before it came is not credited"
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(e["what"], e["rc"]) for e in lines] == [
        ("credit", "00"), ("reversal", "00"), ("reversal_not_found", "25"), ("decline", "05")]
    assert [e["amount_fen"] for e in lines[:2]] == [400, 400]
    assert lines[0]["rrn"] == lines[1]["rrn"] == upstream_rrn
    assert all(tuple(e) == ("what", "kind", "rrn", "trace", "amount_fen", "account", "rc", "at") for e in lines)
    assert BANK_CARD not in ledger.read_text() and lines[0]["account"].startswith("622202")
    assert host_ledger.net_credited_fen(ledger) == 0
    assert await net.invariants() == []


def test_a_ledger_line_cut_short_by_a_crash_is_dropped_and_the_file_repaired(tmp_path: Path):
    ledger = tmp_path / "bank.jsonl"
    credit = host_ledger.line_of("credit", "credit", "000000000001", "000001", 700, BANK_CARD, "00")
    host_ledger.append(ledger, credit)
    with open(ledger, "a") as f:
        f.write('{"what":"credit","kind":"cre')  # the host died writing it: it never answered
    assert host_ledger.net_credited_fen(ledger) == 700
    state, lines = host_ledger.replay(ledger, repair=True)
    assert (lines, state.net_fen(), list(state.entries)) == (1, 700, ["000000000001"])
    host_ledger.append(ledger, host_ledger.line_of("reversal", "credit", "000000000001", "000001", 700, BANK_CARD,
                                                   "00"))
    assert host_ledger.net_credited_fen(ledger) == 0
    assert len(ledger.read_text().splitlines()) == 2


# -- 3. connector state ------------------------------------------------------------------------------
async def test_a_connectors_last_error_is_cleared_once_a_link_is_up(switch: SwitchUnderTest):
    bank = await HostSimulator("bank").start()
    insurer = await HostSimulator("insurer").start()
    await bank.stop()  # the bank is down when the switch starts

    async def reported() -> dict:
        await running.forwarder._publish()  # what the switch writes every 2 s for `admin connectors`
        con = await asyncpg.connect(switch.dsn)
        try:
            return next(r for r in await admin.connectors(con) if r["name"] == "bank")
        finally:
            await con.close()

    try:
        async with upstream_switch(switch, bank, insurer, wait_links=False) as running:
            connector = running.connectors["bank"]

            async def failing() -> bool:
                return bool(connector.state()["last_error"])

            await _until(failing, what="a connect failure")
            down = await reported()
            await bank.start()  # the same port
            assert await connector.wait_available(5)
            up = await reported()
    finally:
        await bank.stop()
        await insurer.stop()
    assert down["state"]["links_up"] == 0 and "connect" in down["state"]["last_error"]
    assert down["state"]["last_error_at"]
    assert "last error at " in _connectors_text([down])
    assert up["state"]["links_up"] >= 1
    assert (up["state"]["last_error"], up["state"]["last_error_at"]) == ("", None)
    assert "last error" not in _connectors_text([up])
    # A report from a switch that kept its last error while every link is up: not shown.
    stale = {**up, "state": {**up["state"], "links_up": 2, "links": 2, "last_error": "connect: refused"}}
    assert "last error" not in _connectors_text([stale])
