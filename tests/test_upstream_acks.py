"""A reversal is acknowledged only when the host approves it (39 = 00, or 25: original
not found). Any other answer leaves the host holding the credit, so the points stay
paid out and the reversal is repeated, over real TCP against the real database."""

from __future__ import annotations

import asyncio

from .conftest import SwitchUnderTest
from .test_upstream import BANK_CARD, TIMEOUT_S, Rule, World, world_of


async def _until(condition, timeout_s: float = 8.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _reversals_sent(w: World) -> list[dict[str, str]]:
    return [f for f in w.bank.received if f["t"] in ("0400", "0420")]


async def _reversal_postings(w: World, request_rrn: str) -> int:
    rows = await w.fetch(
        "SELECT count(*) AS n FROM postings p JOIN requests r USING (request_id)"
        " WHERE r.upstream_reference = $1 AND p.reason = 'reversal'", request_rrn)
    return int(rows[0]["n"])


async def test_a_refused_reversal_keeps_the_points_out_until_the_host_approves_it(switch: SwitchUnderTest):
    async with world_of(switch, bank_options={"reversal_rc": "96"}) as w:
        card = w.net.cards[0]
        await w.earn(card, 1000)
        async with w.terminal() as term:
            approved = await term.cash_out(card, 400, BANK_CARD)
            reversed_ = await term.reverse(approved.request)
        assert (approved.rc, reversed_.rc) == ("00", "00")
        rrn = w.bank.requests("0200")[0]["37"]

        async def refused_and_repeated() -> bool:
            return len(_reversals_sent(w)) >= 2

        await _until(refused_and_repeated, what="a refused reversal and its repeat")
        [row] = await w.reversals()
        assert (row["state"], row["upstream_rc"]) == ("pending", "96"), "a 96 is not an acknowledgement"
        assert "96" in row["last_error"]
        assert row["attempts"] >= 2
        assert [f["t"] for f in _reversals_sent(w)][:2] == ["0400", "0420"], "repeats are 0420"
        assert await w.net.balance(card) == 600, "points stay out while the bank keeps the credit"
        assert w.bank.net_fen() == 400
        assert await w.paid_out_fen() == 400 == w.bank.net_fen()

        w.bank.reversal_rc = "00"  # the bank recovers and undoes the credit
        rows = await w.drained()
        await asyncio.sleep(0.5)  # nothing more happens to an acknowledged reversal
        assert [(r["state"], r["upstream_rc"]) for r in rows] == [("acknowledged", "00")]
        assert await w.net.balance(card) == 1000
        assert await _reversal_postings(w, rrn) == 1, "the points came back exactly once"
        assert w.bank.net_fen() == 0


async def test_a_host_that_never_saw_the_original_acknowledges_with_25(switch: SwitchUnderTest):
    async with world_of(switch) as w:
        card = w.net.cards[0]
        await w.earn(card, 1000)
        w.bank.rules = [Rule(action="drop", times=1)]  # never credited, never answered
        async with w.terminal() as term:
            reply = await term.cash_out(card, 300, BANK_CARD)
        assert reply.rc == "98"
        rows = await w.drained()
        assert [(r["reason"], r["state"], r["upstream_rc"]) for r in rows] == [("timeout", "acknowledged", "25")]
        assert await w.net.balance(card) == 1000
        await asyncio.sleep(TIMEOUT_S)
        assert w.bank.net_fen() == 0
