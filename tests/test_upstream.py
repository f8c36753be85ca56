"""Points leaving the network through upstream hosts, end to end over TCP.

A switch with `bank` and `insurer` connectors runs in the test's own loop,
beside the bank and insurer simulators; terminals talk `cup` to it. After every
test the ledger invariants hold and, once every reversal is delivered, the
money the bank simulator holds as credited equals the cash the switch paid out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointswitch.app import Running, running_switch
from pointswitch.config import ConnectorConfig, UsageConfig
from pointswitch.simulators.host import HostSimulator, Rule

from .conftest import Network, SwitchUnderTest, _test_config, make_network

BANK_CARD = "6222020000000000018"
POLICY = "2026000123456"  # field 48 is numeric in cup
TIMEOUT_S = 0.5


def _config(sut: SwitchUnderTest, bank: HostSimulator, insurer: HostSimulator, **overrides: object):
    cfg = _test_config()
    cfg.database.data_dir = str(sut.data_dir)
    quick = {"response_timeout_s": TIMEOUT_S, "connections": 2, "backoff_initial_s": 0.05, "backoff_max_s": 0.3,
             "reversal_retry_s": 0.1, "reversal_retry_max_s": 0.3, "echo_interval_s": 5.0, **overrides}
    cfg.connectors = [ConnectorConfig("bank", port=bank.port, **quick),
                      ConnectorConfig("insurer", port=insurer.port, **quick)]
    cfg.cash_out = UsageConfig(connector="bank", points_per_yuan="100", min_amount_fen=100, daily_limit_fen=100_000)
    cfg.insurance = UsageConfig(connector="insurer", points_per_yuan="100", fee_points=10, daily_limit_fen=1_000_000)
    return cfg


@contextlib.asynccontextmanager
async def hosts(**bank_options: Any) -> AsyncIterator[tuple[HostSimulator, HostSimulator]]:
    """A bank and an insurer simulator, listening on free ports; both stopped at the end."""
    bank = await HostSimulator("bank", **bank_options).start()
    insurer = await HostSimulator("insurer").start()
    try:
        yield bank, insurer
    finally:
        await bank.stop()
        await insurer.stop()


@contextlib.asynccontextmanager
async def upstream_switch(sut: SwitchUnderTest, bank: HostSimulator, insurer: HostSimulator,
                          *, wait_links: bool = True, bank_only: dict[str, Any] | None = None,
                          **overrides: object) -> AsyncIterator[Running]:
    """A switch whose connectors reach ``bank`` and ``insurer``: ``overrides`` apply to
    both connectors, ``bank_only`` to the bank's alone (TLS, MAC)."""
    cfg = _config(sut, bank, insurer, **overrides)
    cfg.connectors[0] = dataclasses.replace(cfg.connectors[0], **(bank_only or {}))
    async with running_switch(cfg, sut.dsn, sut.vault) as running:
        if wait_links:
            for connector in running.connectors.values():
                assert await connector.wait_available(5), f"{connector.name} link not up"
        yield running


_trace_blocks = itertools.count(0)


def _terminal(net: Network, n: int, running: Running):
    """A terminal of ``net`` talking to ``running``; each client gets its own block of
    trace numbers, as one terminal's successive sessions would."""
    term = net.terminal(n)
    term.port = running.address("cup")[1]
    term.trace = next(_trace_blocks) * 1000 % 999_000
    return term


@dataclasses.dataclass
class World:
    sut: SwitchUnderTest
    bank: HostSimulator
    insurer: HostSimulator
    net: Network
    running: Running

    def terminal(self, n: int = 0):
        return _terminal(self.net, n, self.running)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        con = await asyncpg.connect(self.sut.dsn)
        try:
            return await con.fetch(sql, *args)
        finally:
            await con.close()

    async def paid_out_fen(self, operation: str = "cash_out") -> int:
        rows = await self.fetch(
            "SELECT coalesce(sum(r.amount_fen), 0) AS fen FROM requests r WHERE r.operation = $1"
            " AND r.state = 'approved' AND r.terminal_id = ANY($2::text[]) AND NOT EXISTS ("
            " SELECT 1 FROM upstream_reversals u WHERE u.request_id = r.request_id"
            " AND (u.state = 'acknowledged' OR u.resolved_outcome = 'reversed'))",
            operation, self.net.terminal_ids,
        )
        return int(rows[0]["fen"])

    async def reversals(self) -> list[asyncpg.Record]:
        return await self.fetch(
            "SELECT u.* FROM upstream_reversals u JOIN requests r USING (request_id)"
            " WHERE r.terminal_id = ANY($1::text[]) ORDER BY reversal_id", self.net.terminal_ids)

    async def drained(self, timeout_s: float = 10) -> list[asyncpg.Record]:
        """Wait until every reversal of this test's terminals is acknowledged (or resolved)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            rows = await self.reversals()
            if all(r["state"] in ("acknowledged", "resolved") for r in rows):
                return rows
            assert asyncio.get_running_loop().time() < deadline, f"reversals not delivered: {[dict(r) for r in rows]}"
            await asyncio.sleep(0.1)

    async def earn(self, card: str, amount_fen: int, terminal: int = 0) -> None:
        async with self.terminal(terminal) as term:
            assert (await term.accrue(card, amount_fen)).rc == "00"


@contextlib.asynccontextmanager
async def world_of(switch: SwitchUnderTest, *, bank_options: dict[str, Any] | None = None,
                   bank_only: dict[str, Any] | None = None, terminals: int = 8,
                   **overrides: object) -> AsyncIterator[World]:
    """A network, the hosts (the bank with ``bank_options``) and a switch; at the end
    every reversal is delivered, the invariants hold and points paid out equal the
    money the hosts hold as credited."""
    net = await make_network(switch, terminals=terminals, cards=4, earn_rate="100")  # 1 yuan earns 100 points
    async with hosts(**(bank_options or {})) as (bank, insurer):
        async with upstream_switch(switch, bank, insurer, bank_only=bank_only, **overrides) as running:
            w = World(switch, bank, insurer, net, running)
            yield w
            await w.drained()
        assert await net.invariants() == []
        assert await w.paid_out_fen() == bank.net_fen(), "points paid out = money the bank holds as credited"
        assert await w.paid_out_fen("insurance") == insurer.net_fen()


@pytest.fixture
async def world(switch: SwitchUnderTest) -> AsyncIterator[World]:
    async with world_of(switch) as w:
        yield w


async def test_cash_out_approved_credits_the_bank_card_once(world: World):
    card = world.net.cards[0]
    await world.earn(card, 1000)  # 1000 points
    async with world.terminal() as term:
        reply = await term.cash_out(card, 500, BANK_CARD)
        again = await term.send(reply.request)  # a retransmission: same answer, nothing sent upstream again
    assert (reply.rc, reply.points_moved, reply.points_balance) == ("00", 500, 500)
    assert reply.mac_ok is True
    assert again.fields["39"] == "00" and again.fields["37"] == reply.fields["37"]
    credits = world.bank.requests("0200")
    assert len(credits) == 1
    assert (credits[0]["2"], credits[0]["3"], credits[0]["4"]) == (BANK_CARD, "260000", "000000000500")
    assert world.bank.net_fen() == 500
    assert await world.net.balance(card) == 500


async def test_insurance_premium_paid_with_points_returns_the_insurers_reference(world: World):
    card = world.net.cards[0]
    await world.earn(card, 3000)
    async with world.terminal() as term:
        reply = await term.insurance(card, 2000, POLICY)
    assert reply.rc == "00"
    paid = world.insurer.requests("0200")
    assert [(p["3"], p["48"], p["4"]) for p in paid] == [("500000", POLICY, "000000002000")]
    assert reply.fields["63"] == f"INS{paid[0]['37']}"
    assert reply.points_balance == 3000 - 2000 - 10  # 100 points a yuan, plus a fee of 10
    assert world.insurer.net_fen() == 2000


@pytest.mark.parametrize(("host_rc", "terminal_rc"), [("14", "14"), ("51", "05"), ("61", "61")])
async def test_declined_upstream_releases_the_hold(world: World, host_rc: str, terminal_rc: str):
    card = world.net.cards[0]
    await world.earn(card, 1000)
    world.bank.rules = [Rule(action="decline", rc=host_rc, card=BANK_CARD)]
    async with world.terminal() as term:
        reply = await term.cash_out(card, 400, BANK_CARD)
    assert reply.rc == terminal_rc, "the host's code where it fits, else 05"
    assert reply.points_balance is None, "a decline carries no balance"
    assert await world.net.balance(card) == 1000
    assert world.bank.net_fen() == 0


async def test_declines_before_anything_leaves_the_network(world: World):
    card, poor = world.net.cards[0], world.net.cards[1]
    await world.earn(card, 100_000)  # plenty of points
    async with world.terminal() as term:
        insufficient = await term.cash_out(poor, 500, BANK_CARD)
        wrong_pin = await term.cash_out(card, 500, BANK_CARD, pin="999999")
        too_small = await term.cash_out(card, 50, BANK_CARD)
        first = await term.cash_out(card, 90_000, BANK_CARD)
        over_limit = await term.cash_out(card, 20_000, BANK_CARD)  # 110 000 fen today > 100 000
        bad_account = await term.cash_out(card, 500, "1234")  # not a bank card number
    assert (insufficient.rc, wrong_pin.rc, too_small.rc, first.rc, over_limit.rc, bad_account.rc) == (
        "51", "55", "13", "00", "61", "30")
    assert len(world.bank.requests("0200")) == 1, "only the approved one went upstream"


async def test_host_not_reachable_answers_91_and_holds_nothing(switch: SwitchUnderTest):
    bank = await HostSimulator("bank").start()
    insurer = await HostSimulator("insurer").start()
    net = await make_network(switch, terminals=1, cards=1, earn_rate="100")
    await bank.stop()  # the bank is down before the switch ever connects
    async with upstream_switch(switch, bank, insurer, wait_links=False) as running:
        term = _terminal(net, 0, running)
        async with term:
            await term.accrue(net.cards[0], 1000)
            reply = await term.cash_out(net.cards[0], 500, BANK_CARD)
        state = running.connectors["bank"].state()
    await insurer.stop()
    assert reply.rc == "91"
    assert await net.balance(net.cards[0]) == 1000
    assert state["links_up"] == 0 and state["last_error"]
    con = await asyncpg.connect(switch.dsn)
    try:
        held = await con.fetchval("SELECT count(*) FROM requests WHERE terminal_id = $1 AND operation = 'cash_out'",
                                  net.terminal_ids[0])
    finally:
        await con.close()
    assert held == 0
    assert await net.invariants() == []


async def test_timeout_then_late_approval_is_reversed_never_posted(world: World):
    card = world.net.cards[0]
    await world.earn(card, 1000)
    world.bank.rules = [Rule(action="approve", delay_s=TIMEOUT_S * 3, times=1)]
    async with world.terminal() as term:
        reply = await term.cash_out(card, 600, BANK_CARD)
    assert reply.rc == "98"
    assert await world.net.balance(card) == 1000, "the hold is released at once"
    rows = await world.drained()
    assert [(r["reason"], r["state"]) for r in rows] == [("timeout", "acknowledged")]
    await asyncio.sleep(TIMEOUT_S * 3)  # let the late approval arrive
    assert [e.reversed for e in world.bank.entries.values()] == [True], "credited late, then reversed"
    assert world.bank.net_fen() == 0
    assert await world.net.balance(card) == 1000
    assert world.running.connectors["bank"].state()["late"] >= 1


async def test_reversal_is_delivered_when_the_host_comes_back(world: World):
    card = world.net.cards[0]
    await world.earn(card, 1000)
    world.bank.rules = [Rule(action="drop", times=1)]
    async with world.terminal() as term:
        reply = await term.cash_out(card, 300, BANK_CARD)
        await world.bank.stop()  # the bank goes down with the reversal owed
        await asyncio.sleep(1.0)
        assert [r["state"] for r in await world.reversals()] == ["pending"]
        await world.bank.start()  # same port
        rows = await world.drained()
    assert reply.rc == "98"
    assert rows[0]["attempts"] >= 1
    assert [f["t"] for f in world.bank.received if f["t"].startswith("04")], "the reversal reached the host"
    assert await world.net.balance(card) == 1000


async def test_reversal_owed_survives_a_restart_of_the_switch(switch: SwitchUnderTest):
    net = await make_network(switch, terminals=1, cards=1, earn_rate="100")

    async def reversal_states() -> list[str]:
        con = await asyncpg.connect(switch.dsn)
        try:
            rows = await con.fetch("SELECT u.state FROM upstream_reversals u JOIN requests r USING (request_id)"
                                   " WHERE r.terminal_id = $1", net.terminal_ids[0])
        finally:
            await con.close()
        return [r["state"] for r in rows]

    async with hosts(rules=[Rule(action="drop", times=1)], answer_reversals=False) as (bank, insurer):
        async with upstream_switch(switch, bank, insurer) as running:
            async with _terminal(net, 0, running) as term:
                await term.accrue(net.cards[0], 1000)
                timed_out = await term.cash_out(net.cards[0], 200, BANK_CARD)
            await asyncio.sleep(1.5)  # the forwarder tries, the host does not acknowledge
        assert timed_out.rc == "98"
        assert await reversal_states() == ["pending"], "the reversal is still owed while the switch is down"
        tries_before_restart = len(bank.requests("0400") + bank.requests("0420"))
        bank.answer_reversals = True
        async with upstream_switch(switch, bank, insurer):
            for _ in range(100):
                if await reversal_states() == ["acknowledged"]:
                    break
                await asyncio.sleep(0.1)
        assert await reversal_states() == ["acknowledged"], "delivered after the restart"
    assert tries_before_restart >= 1
    assert bank.requests("0420"), "repeats after the first try are 0420"
    assert bank.net_fen() == 0
    assert await net.balance(net.cards[0]) == 1000
    assert await net.invariants() == []


async def test_terminal_reversal_gives_points_back_only_when_the_host_acknowledges(world: World):
    card = world.net.cards[0]
    await world.earn(card, 1000)
    async with world.terminal() as term:
        approved = await term.cash_out(card, 400, BANK_CARD)
        await world.bank.stop()  # the host is down when the terminal reverses
        reversed_ = await term.reverse(approved.request)
        await asyncio.sleep(0.5)
        before_ack = await world.net.balance(card)
        await world.bank.start()
        await world.drained()
    assert (approved.rc, reversed_.rc) == ("00", "00")
    assert before_ack == 600, "points stay out until the bank acknowledges the reversal"
    assert await world.net.balance(card) == 1000
    assert world.bank.net_fen() == 0


async def test_200_concurrent_conversions_each_matched_to_its_own_request(world: World):
    cards = world.net.cards
    for card in cards:
        await world.earn(card, 60_000)

    async def one_terminal(n: int) -> list[tuple[str, str, str]]:
        async with world.terminal(n) as term:
            sends = [term.cash_out(cards[(n + i) % len(cards)], 100 + n * 25 + i, BANK_CARD) for i in range(25)]
            replies = await asyncio.gather(*sends)
        return [(r.rc, r.fields["4"], r.request["4"]) for r in replies]

    results = [x for batch in await asyncio.gather(*(one_terminal(n) for n in range(8))) for x in batch]
    assert len(results) == 200
    assert all(rc == "00" for rc, _, _ in results), {rc for rc, _, _ in results}
    assert all(got == sent for _, got, sent in results)
    credited = sorted(e.amount_fen for e in world.bank.entries.values())
    assert credited == sorted(int(sent) for _, _, sent in results), "every credit once, none crossed"
    assert world.running.connectors["bank"].state()["links_up"] == 2


_leg = st.tuples(
    st.sampled_from(["approve", "decline", "late", "drop", "host_down"]),
    st.integers(min_value=100, max_value=900),  # fen
    st.booleans(),  # the terminal reverses it afterwards
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(legs=st.lists(_leg, min_size=1, max_size=5))
async def test_any_sequence_of_host_behaviours_pays_out_exactly_what_the_bank_credited(switch, legs):
    """Whatever the host does (approve, decline, answer late, drop, be down) and whatever
    the terminal reverses, once the reversals are delivered: points paid out equal money
    credited, the card holds what it earned minus what was paid out, and the invariants hold."""
    net = await make_network(switch, terminals=1, cards=1, earn_rate="100")
    card = net.cards[0]
    async with hosts() as (bank, insurer):
        async with upstream_switch(switch, bank, insurer) as running:
            w = World(switch, bank, insurer, net, running)
            await w.earn(card, 10_000)  # 10 000 points: every leg can be paid
            async with w.terminal() as term:
                for behaviour, fen, reverse in legs:
                    bank.rules = {"decline": [Rule(action="decline", rc="05")],
                                  "late": [Rule(action="approve", delay_s=TIMEOUT_S * 2)],
                                  "drop": [Rule(action="drop")]}.get(behaviour, [])
                    if behaviour == "host_down":
                        await bank.stop()
                    reply = await term.cash_out(card, fen, BANK_CARD)
                    expected = {"approve": "00", "decline": "05", "late": "98", "drop": "98", "host_down": "91"}
                    assert reply.rc == expected[behaviour]
                    if reverse:
                        assert (await term.reverse(reply.request)).rc == "00"
                    if behaviour == "host_down":
                        await bank.start()
                        assert await running.connectors["bank"].wait_available(5)
            bank.rules = []
            await asyncio.sleep(TIMEOUT_S * 2)  # late answers arrive
            await w.drained()
            paid = await w.paid_out_fen()
        assert paid == bank.net_fen()
        assert await net.balance(card) == 10_000 - paid, "100 points a yuan: 1 point a fen"
        assert await net.invariants() == []
