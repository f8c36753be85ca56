"""How answers find their requests: by 11 + 41 or by 37; and an answer is its request's
only if it echoes 2 (when sent), 4, 11, 37 and 41. One found by its key that changes any
of them is logged (masked), counted and ignored: the request times out and is reversed
as usual."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from collections.abc import Iterator

import pytest

from pointswitch import logs

from .conftest import SwitchUnderTest, make_network
from .test_upstream import BANK_CARD, World, hosts, upstream_switch, world_of


@contextlib.contextmanager
def _captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("warning", json=True, stream=stream)
    try:
        yield stream
    finally:
        logs.configure(os.environ.get("POINTSWITCH_TEST_LOG_LEVEL", "warning"))


async def _cash_out_answered_with(w: World, field: str, fen: int) -> str:
    """A cash-out whose answer from the bank has ``field`` changed: the terminal's code."""
    card = w.net.cards[0]
    w.bank.corrupt_field = field
    mismatched_before = w.running.connectors["bank"].state()["mismatched"]
    async with w.terminal() as term:
        reply = await term.cash_out(card, fen, BANK_CARD)
    assert w.running.connectors["bank"].state()["mismatched"] > mismatched_before, f"field {field}: not counted"
    assert [r["state"] for r in await w.reversals()][-1] == "pending", "its reversal's answer is corrupt too"
    w.bank.corrupt_field = None
    await w.drained()
    return reply.rc


@pytest.mark.parametrize(("match_key", "fields"), [("11+41", ["4", "37", "2"]), ("37", ["41", "11"])])
async def test_an_answer_that_does_not_echo_its_request_is_not_accepted(switch: SwitchUnderTest, match_key: str,
                                                                       fields: list[str]):
    async with world_of(switch, match_key=match_key) as w:
        card = w.net.cards[0]
        await w.earn(card, 5000)
        with _captured_logs() as logged:
            codes = [await _cash_out_answered_with(w, field, 100 + i) for i, field in enumerate(fields)]
        assert codes == ["98"] * len(fields), "timed out as if unanswered"
        assert await w.net.balance(card) == 5000, "points back, nothing paid out"
        assert w.bank.net_fen() == 0, "what the bank credited was reversed"
        assert w.running.connectors["bank"].state()["late"] == 0, "found by the key, refused on the echo"
        async with w.terminal() as term:
            assert (await term.cash_out(card, 100, BANK_CARD)).rc == "00", "a faithful answer is accepted"
    events = [json.loads(line) for line in logged.getvalue().splitlines() if line.startswith("{")]
    refused = [e for e in events if e["event"] == "upstream response does not answer its request: ignored"]
    assert {e["problem"] for e in refused} >= {f"does not echo field {f}" for f in fields}
    assert BANK_CARD not in logged.getvalue(), "no card number in clear in any log line"
    if "2" in fields:
        assert any(e["iso"].get("2", "").startswith("622202") and "*" in e["iso"]["2"] for e in refused)


async def test_responses_can_be_matched_by_retrieval_reference(switch: SwitchUnderTest):
    net = await make_network(switch, terminals=2, cards=2, earn_rate="100")
    async with hosts() as (bank, insurer):
        async with upstream_switch(switch, bank, insurer, match_key="37") as running:
            w = World(switch, bank, insurer, net, running)
            for card in net.cards:
                await w.earn(card, 5000)

            async def burst(n: int) -> list[str]:
                async with w.terminal(n) as term:
                    replies = await asyncio.gather(*(term.cash_out(net.cards[n], 100 + i, BANK_CARD)
                                                     for i in range(20)))
                return [r.rc for r in replies]

            codes = [c for batch in await asyncio.gather(burst(0), burst(1)) for c in batch]
            await w.drained()
            assert codes == ["00"] * 40
            assert await w.paid_out_fen() == bank.net_fen() == sum(2 * (100 + i) for i in range(20))
    assert await net.invariants() == []
