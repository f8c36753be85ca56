"""The trace (11) and retrieval reference (37) sent upstream are unique across switch
processes and restarts: they come from a PostgreSQL sequence, not from the process."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from pointswitch.config import ConnectorConfig
from pointswitch.ledger.identity import IdentityBlocks
from pointswitch.switch.upstream import Connector

from .conftest import SwitchUnderTest, make_network
from .test_upstream import BANK_CARD, _terminal, hosts, upstream_switch


@contextlib.asynccontextmanager
async def _connector(sut: SwitchUnderTest):
    """A connector as one switch process builds it: its own pool and identity blocks."""
    pool = await asyncpg.create_pool(sut.dsn, min_size=1, max_size=2)
    try:
        yield Connector(ConnectorConfig("bank", port=9), identities=IdentityBlocks(pool).next)
    finally:
        await pool.close()


async def test_two_connectors_on_one_database_never_draw_the_same_reference(switch: SwitchUnderTest):
    async with _connector(switch) as one, _connector(switch) as two:
        draws = await asyncio.gather(*(c.next_stan() for _ in range(1500) for c in (one, two)))
    rrns = [d.rrn for d in draws]
    assert len(set(rrns)) == len(rrns) == 3000, "no 37 twice across processes"
    assert len({d.stan for d in draws}) == 3000, "nor 11"
    assert all(len(d.rrn) == 12 and d.rrn.isdigit() and len(d.stan) == 6 and d.stan.isdigit() for d in draws)
    async with _connector(switch) as restarted:  # the same process started again
        after = [await restarted.next_stan() for _ in range(250)]
    assert not {d.rrn for d in after} & set(rrns), "a restarted connector never repeats an earlier 37"
    assert min(int(d.rrn) for d in after) > max(int(r) for r in rrns), "numbers only grow"


async def test_two_switches_and_a_restart_never_send_the_same_reference_upstream(switch: SwitchUnderTest):
    net = await make_network(switch, terminals=3, cards=3, earn_rate="100")

    async def burst(running, n: int, fen: int) -> list[str]:
        async with _terminal(net, n, running) as term:
            await term.accrue(net.cards[n], 10_000)
            replies = await asyncio.gather(*(term.cash_out(net.cards[n], fen + i, BANK_CARD) for i in range(10)))
        return [r.rc for r in replies]

    async with hosts() as (bank, insurer):
        async with upstream_switch(switch, bank, insurer) as first, upstream_switch(switch, bank, insurer) as second:
            codes = [c for batch in await asyncio.gather(burst(first, 0, 100), burst(second, 1, 200)) for c in batch]
        async with upstream_switch(switch, bank, insurer) as restarted:  # both stopped, one started again
            codes += await burst(restarted, 2, 300)
    credits = bank.requests("0200")
    assert codes == ["00"] * 30
    assert len(credits) == 30
    assert len({c["37"] for c in credits}) == 30, "every request its own retrieval reference"
    assert len({c["11"] for c in credits}) == 30
    assert len(bank.entries) == 30, "so the bank credited each one (a shared 37 would be credited once)"
    assert bank.net_fen() == sum(base + i for base in (100, 200, 300) for i in range(10))
    assert await net.invariants() == []
