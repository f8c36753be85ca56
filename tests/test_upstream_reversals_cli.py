"""`pointswitch admin reversals list|retry|resolve` as an operator uses it: a process
of its own against the database of a running switch whose bank refuses reversals
until they expire."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from .conftest import SwitchUnderTest
from .test_upstream import BANK_CARD, World, world_of

PS = [sys.executable, "-m", "pointswitch"]


async def _cli(sut: SwitchUnderTest, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *PS, "admin", "reversals", *args, "--dsn", sut.dsn,
        env={**os.environ, "POINTSWITCH_MASTER_KEY": sut.master_key_hex},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _json(sut: SwitchUnderTest, *args: str) -> Any:
    code, out, err = await _cli(sut, *args, "--json")
    assert code == 0, f"{args} exited {code}: {err}"
    return json.loads(out)


async def _states(w: World) -> list[str]:
    return [r["state"] for r in await w.reversals()]


async def _wait_states(w: World, wanted: list[str], timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await _states(w) != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"{await _states(w)} never became {wanted}"
        await asyncio.sleep(0.1)


async def test_operator_lists_retries_and_resolves_expired_reversals(switch: SwitchUnderTest):
    async with world_of(switch, bank_options={"reversal_rc": "96"}, reversal_max_age_s=0.3) as w:
        card = w.net.cards[0]
        await w.earn(card, 1000)
        async with w.terminal() as term:
            for fen in (300, 200, 100):  # three conversions, each reversed by the terminal
                approved = await term.cash_out(card, fen, BANK_CARD)
                assert (approved.rc, (await term.reverse(approved.request)).rc) == ("00", "00")
        await _wait_states(w, ["expired"] * 3)  # refused (96) until too old: operator action needed
        assert await w.net.balance(card) == 400
        ids = [r["reversal_id"] for r in await w.reversals()]
        sent_before = len(w.bank.requests("0400") + w.bank.requests("0420"))

        listed = await _json(switch, "list", "--state", "expired", "--limit", "1000")
        ours = sorted((r for r in listed if r["terminal_id"] in w.net.terminal_ids), key=lambda r: r["reversal_id"])
        assert [r["reversal_id"] for r in ours] == ids
        first = ours[0]
        assert (first["connector"], first["reason"], first["state"], first["upstream_rc"]) == (
            "bank", "terminal_reversal", "expired", "96")
        assert first["attempts"] >= 1 and first["age_s"] >= 0.3 and "96" in first["last_error"]
        assert [r["amount_fen"] for r in ours] == [300, 200, 100]
        assert first["upstream_rrn"] == w.bank.requests("0200")[0]["37"]
        code, text, _ = await _cli(switch, "list")
        assert code == 0 and str(ids[0]) in text and "expired" in text
        for shown in (json.dumps(listed), text):
            assert BANK_CARD not in shown and card not in shown, "no card number, member's or bank's"
            assert BANK_CARD[:6] not in shown and "card" not in shown
        await asyncio.sleep(0.5)
        assert len(w.bank.requests("0400") + w.bank.requests("0420")) == sent_before, "expired: not sent"

        # The bank is fixed; the operator sends the first one again.
        w.bank.reversal_rc = "00"
        retried = await _json(switch, "retry", str(ids[0]))
        assert (retried["state"], retried["was"]) == ("pending", "expired")
        await _wait_states(w, ["acknowledged", "expired", "expired"])
        assert await w.net.balance(card) == 700

        # The second was undone at the bank by hand: the points come back as on an acknowledgement.
        rrn_2 = w.bank.requests("0200")[1]["37"]
        w.bank.entries[rrn_2].reversed = True  # what the bank's operator did
        resolved = await _json(switch, "resolve", str(ids[1]), "--outcome", "reversed")
        assert (resolved["state"], resolved["outcome"], resolved["points_back"]) == ("resolved", "reversed", 200)
        assert await w.net.balance(card) == 900
        # The bank kept the third: the points stay paid out.
        kept = await _json(switch, "resolve", str(ids[2]), "--outcome", "kept")
        assert (kept["outcome"], kept["points_back"]) == ("kept", 0) and "note" not in kept
        assert await w.net.balance(card) == 900

        # Closed rows are final (and a forwarder pass or more goes by meanwhile: nothing is sent for them).
        refusals = (("resolve", str(ids[2]), "--outcome", "reversed"), ("resolve", str(ids[1]), "--outcome", "kept"),
                    ("retry", str(ids[2])), ("retry", str(ids[0])), ("resolve", "999999999", "--outcome", "kept"))
        started = asyncio.get_running_loop().time()
        for args, (code, _, err) in zip(refusals, await asyncio.gather(*(_cli(switch, *a) for a in refusals)),
                                        strict=True):
            assert code != 0, f"{args} was allowed"
            assert "already" in err or "no reversal" in err, err
        await asyncio.sleep(max(0.0, 1.2 - (asyncio.get_running_loop().time() - started)))
        assert len(w.bank.requests("0400") + w.bank.requests("0420")) == sent_before + 1
        assert await _states(w) == ["acknowledged", "resolved", "resolved"]
        assert await w.net.balance(card) == 900
        assert w.bank.net_fen() == 100 == await w.paid_out_fen()
        reversal_postings = await w.fetch(
            "SELECT r.amount_fen FROM postings p JOIN requests r USING (request_id) WHERE p.reason = 'reversal'"
            " AND r.terminal_id = ANY($1::text[]) ORDER BY r.amount_fen", w.net.terminal_ids)
        assert [r["amount_fen"] for r in reversal_postings] == [200, 300], "each undone once, the kept one never"
        audited = await w.fetch("SELECT action, target FROM audit_log WHERE action LIKE 'reversal.%'"
                                " AND target = ANY($1::text[]) ORDER BY audit_id", [str(i) for i in ids])
        assert [(a["action"], a["target"]) for a in audited] == [
            ("reversal.retry", str(ids[0])), ("reversal.resolve", str(ids[1])), ("reversal.resolve", str(ids[2]))]
