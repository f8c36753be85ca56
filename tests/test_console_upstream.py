"""The console's upstream screens with a real bank host: its connector on the overview,
reversals it refused until they expired, retried and resolved by an operator."""

from __future__ import annotations

import asyncio

from .conftest import SwitchUnderTest
from .test_console import Console, add_operator
from .test_upstream import BANK_CARD, World, world_of


async def _wait_states(w: World, wanted: list[str], timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while [r["state"] for r in await w.reversals()] != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"reversals never became {wanted}"
        await asyncio.sleep(0.1)


async def test_an_operator_retries_and_resolves_expired_reversals_in_the_console(switch: SwitchUnderTest) -> None:
    async with world_of(switch, bank_options={"reversal_rc": "96"}, reversal_max_age_s=0.3) as w:
        card = w.net.cards[0]
        await w.earn(card, 1000)
        async with w.terminal() as term:
            for fen in (300, 200):  # two conversions, each reversed by the terminal
                approved = await term.cash_out(card, fen, BANK_CARD)
                assert (approved.rc, (await term.reverse(approved.request)).rc) == ("00", "00")
        await _wait_states(w, ["expired", "expired"])  # refused (96) until too old: operator action needed
        first, second = [r["reversal_id"] for r in await w.reversals()]
        assert w.running.web is not None and w.running.web.bound is not None
        name = await add_operator(switch.dsn, "operator")
        async with Console(w.running.web.bound) as browser:
            await browser.login(name)
            overview = await browser.get("/")
            assert "<td>bank</td>" in overview and 'id="reversals-waiting"' in overview
            listed = await browser.get("/reversals?state=expired")
            assert f"<td>{first}</td>" in listed and f"<td>{second}</td>" in listed
            assert BANK_CARD not in listed and card not in listed
            w.bank.reversal_rc = "00"  # the bank is fixed: the operator sends the first one again
            await browser.post(f"/reversals/{first}/retry")
            await _wait_states(w, ["acknowledged", "expired"])
            # The bank says it kept the second credit (settled by telephone): the points stay paid out.
            await browser.post(f"/reversals/{second}/resolve", {"outcome": "kept"})
            await browser.post(f"/reversals/{second}/resolve", {"outcome": "kept"}, status=409)  # not twice
            await browser.post(f"/reversals/{first}/retry", status=409)
        assert [r["state"] for r in await w.reversals()] == ["acknowledged", "resolved"]
        assert await w.net.balance(card) == 1000 - 300 - 200 + 300  # the first came back, the second was kept
        audit = await w.fetch("SELECT action, target FROM audit_log WHERE actor = $1 AND action LIKE 'reversal.%'"
                              " ORDER BY audit_id", name)
        assert [(r["action"], r["target"]) for r in audit] == [("reversal.retry", str(first)),
                                                                ("reversal.resolve", str(second))]
