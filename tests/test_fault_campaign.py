"""The fault campaign (bench/faults.py): its short run finds nothing on this build, and its
reconciliation does find what it is there to find (a test of the test). Also the bank and insurer
simulators keep what they credited across a restart on the same journal, which the campaign's
"paid out = credited" rests on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from .conftest import Network, SwitchUnderTest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from campaign.reconcile import reconcile  # noqa: E402 - bench/ is not a package on the path by default
from campaign.terminals import Entry, Rates  # noqa: E402

TABLE_ROWS = [
    "approvals without posting", "postings without approval", "cards whose balance differs from the journals",
    "paid out = credited, bank", "paid out = credited, insurer", "ledger invariants (admin check)",
    "processes left behind", "stuck (pending, reversals never answered)",
]


def test_the_short_campaign_finds_no_violation():
    """About a minute: kill -9 of the switch and of PostgreSQL, SIGSTOP of PostgreSQL, kill -9 of the
    bank simulator, connections dropped mid-frame and a fuzzer, under a load of terminals."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--short", "--keep", "never"],
                         capture_output=True, text=True, timeout=150, cwd=ROOT)
    table = run.stdout
    assert run.returncode == 0, f"exit {run.returncode}\n{table}\n{run.stderr[-6000:]}"
    for row in TABLE_ROWS:
        line = next((ln for ln in table.splitlines() if ln.strip().startswith(row)), None)
        assert line is not None and line.rstrip().endswith("ok"), f"{row}: {line}\n{table}"
    assert re.search(r"faults: switch kill -9 \+ restart\s+[1-9]", table), table
    assert re.search(r"faults: PostgreSQL kill -9 \+ restart\s+[1-9]", table), table
    assert re.search(r"faults: fuzzed frames\s+[1-9]", table), table
    assert "result" in table and table.rstrip().splitlines()[-1].strip() != "" and "FAILED" not in table


async def test_the_reconciliation_finds_lies_lost_points_and_unpaid_credits(switch: SwitchUnderTest,
                                                                             network: Network, tmp_path: Path):
    """Journals that disagree with the ledger, and a host journal that disagrees with the switch,
    are each reported under their own heading."""
    tid, card, other = network.terminal_ids[0], network.cards[0], network.cards[1]
    async with network.terminal(0) as term:
        accrued = await term.accrue(card, 1000)  # 10 points, approved
        lied_about = await term.accrue(card, 500)  # 5 points, approved: the journal will say 96
        unposted = term.request("accrue", other, 700)  # never sent: the journal will say 00
        reversed_ = term.request("redeem", other, 100)  # never sent: the journal will say "reversed"
    assert (accrued.rc, lied_about.rc) == ("00", "00")

    def entry(trace: str, card_number: str, amount: int, final: str, points: int | None = None,
              op: str = "accrue") -> Entry:
        e = Entry(tid, 1, int(trace), op, card_number, amount, final=final, points=points, answers=[final])
        if final == "reversed":
            e.reversal_answers = ["00"]
        return e

    journal = [entry(accrued.trace, card, 1000, "00", 10), entry(lied_about.trace, card, 500, "96"),
               entry(unposted["11"], other, 700, "00", 7), entry(reversed_["11"], other, 100, "reversed", op="redeem")]
    bank = tmp_path / "bank.jsonl"
    bank.write_text(json.dumps({"what": "credit", "kind": "credit", "rrn": "999999999999", "trace": "1",
                                "amount_fen": 300, "account": "622202******0018", "at": "x"}) + "\n")
    rec = await reconcile(switch.dsn, switch.master_key_hex, journal, {tid}, network.cards,
                          Rates(earn_rate=Decimal(1), redeem_value=Decimal(1)), {"bank": bank})
    found = {(f.category, f.key) for f in rec.findings}
    key = f"{tid}:000001:"
    assert ("posting_without_approval", key + lied_about.trace) in found
    assert ("approval_without_posting", key + unposted["11"]) in found
    assert ("reversal_not_recorded", key + reversed_["11"]) in found
    assert ("paid_vs_credited", "bank 37=999999999999") in found
    assert rec.points_doubled == 5 and rec.points_lost == 7, "the card with the hidden accrual, the card without"
    assert rec.count("contradiction") == 0 and rec.count("stuck") == 0
