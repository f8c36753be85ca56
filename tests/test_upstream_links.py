"""The connections to a host: kept alive with echoes and made again when an echo goes
unanswered; and a host that accepts connections and stops reading them does not stall
the switch: a write the link does not take within write_timeout_s breaks the link.
Requests whose bytes may have left are answered 98 and reversed; those never written
get 91."""

from __future__ import annotations

import asyncio

from pointswitch.simulators.host import HostSimulator

from .conftest import SwitchUnderTest, make_network
from .test_upstream import BANK_CARD, TIMEOUT_S, World, _terminal, hosts, upstream_switch

WRITE_TIMEOUT_S = 0.3


async def test_idle_links_are_kept_alive_with_echo_and_dropped_when_echo_goes_unanswered(switch: SwitchUnderTest):
    async with hosts() as (bank, insurer):
        async with upstream_switch(switch, bank, insurer, echo_interval_s=0.2, echo_timeout_s=0.3) as running:
            await asyncio.sleep(1.0)
            echoes = bank.requests("0800")
            state = running.connectors["bank"].state()
            assert echoes and all(e["70"] == "301" for e in echoes), "network management echo, field 70 = 301"
            assert state["last_echo_ok"] is not None and state["links_up"] == 2
            bank.answer_echo = False  # the host stops answering: the links are dropped and made again
            before = len(bank.connections_seen)
            await asyncio.sleep(1.5)
            assert len(bank.connections_seen) > before, "links re-established after an unanswered echo"



async def test_a_host_that_stops_reading_breaks_the_link_instead_of_stalling_the_switch(switch: SwitchUnderTest):
    net = await make_network(switch, terminals=8, cards=8, earn_rate="100")
    deaf = await HostSimulator("bank", reading=False).start()  # accepts, never reads
    insurer = await HostSimulator("insurer").start()
    try:
        async with upstream_switch(switch, deaf, insurer, connections=1, write_timeout_s=WRITE_TIMEOUT_S,
                                   send_buffer_bytes=2048) as running:
            w = World(switch, deaf, insurer, net, running)
            await asyncio.gather(*(w.earn(card, 10_000, terminal=n) for n, card in enumerate(net.cards)))

            async def terminal(n: int) -> list[str]:
                # 8 x 16 requests of ~140 bytes, 18 kB: over three times what the link may
                # hold unsent (2 kB here, 4.5 kB in the socket) plus the host's small window.
                async with _terminal(net, n, running) as term:
                    replies = await asyncio.gather(*(term.cash_out(net.cards[n], 100 + i, BANK_CARD)
                                                     for i in range(16)))
                return [r.rc for r in replies]

            started = asyncio.get_running_loop().time()
            codes = [c for batch in await asyncio.gather(*(terminal(n) for n in range(8))) for c in batch]
            elapsed_s = asyncio.get_running_loop().time() - started
            state = running.connectors["bank"].state()
            reversals = await w.reversals()
            assert set(codes) <= {"98", "91"}, codes
            # A request stuck behind a stalled write would be answered 96 at the terminals'
            # request_timeout_s, its points held until the sweep; none may come near it.
            limit_s = switch.config.limits.request_timeout_s - 2
            assert elapsed_s < limit_s, f"answered in {elapsed_s:.1f} s: requests waited on the stalled host"
            assert state["write_timeouts"] >= 1
            assert await running.connectors["bank"].wait_available(2)
            assert len(deaf.connections_seen) >= 2, "the stalled link was dropped and made again"
            assert len(reversals) == codes.count("98"), "every request that may have left is reversed"
            assert "lost" in {r["reason"] for r in reversals}, "the one stalled mid-write counts as sent"
            pending = await w.fetch("SELECT count(*) AS n FROM requests WHERE state = 'pending'"
                                    " AND terminal_id = ANY($1::text[])", net.terminal_ids)
            assert pending[0]["n"] == 0
            for card in net.cards:
                assert await net.balance(card) == 10_000, "nothing held, nothing paid out"

            await deaf.stop()  # the host is repaired: one that reads, on the same port
            bank = await HostSimulator("bank", port=deaf.port).start()
            try:
                w.bank = bank
                await w.drained(timeout_s=15)
                await asyncio.sleep(TIMEOUT_S)
                assert bank.net_fen() == 0 == await w.paid_out_fen()
            finally:
                await bank.stop()
    finally:
        await deaf.stop()
        await insurer.stop()
    assert await net.invariants() == []
