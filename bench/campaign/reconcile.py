"""Every terminal's view against the ledger, request by request and card by card, and the
switch's payouts against the upstream hosts' journals. Reads the database only (a read-only
session); card numbers are found by their card index under the vault's data key.

What a terminal's view promises (docs/integrator.md, "What the answers promise"):

- 00: the request is approved in the ledger with its postings, and was not reversed;
- any other answer (a decline, 96, 98 ...): nothing of it stays posted;
- no answer, then its reversal answered: nothing of it stays posted (a reversal that had to take
  back points the member had spent leaves the shortfall it records);
- and each card's balance is what those views add up to.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from pointswitch.ledger.vault import Vault

from .terminals import SIGN, Entry, Rates

# Postings an approved request must have (when it moved points).
REQUIRED = {"accrue": {"accrue"}, "redeem": {"redeem"}, "void_accrual": {"void"}, "void_redemption": {"void"},
            "refund": {"refund"}, "cash_out": {"hold", "payout"}, "insurance": {"hold", "payout"}}
# Operations whose reversal takes points back from the card (and may fall short).
TAKE_BACK = {"accrue", "void_redemption"}


@dataclass
class Finding:
    category: str
    key: str  # request key, card (masked), or upstream reference
    detail: str


@dataclass
class Reconciliation:
    findings: list[Finding] = field(default_factory=list)
    checked_requests: int = 0
    rows: int = 0
    cards_checked: int = 0
    points_lost: int = 0
    points_doubled: int = 0
    cards_short: int = 0
    cards_over: int = 0
    paid: dict[str, dict[str, int]] = field(default_factory=dict)  # connector -> switch_fen, host_fen, refs ...
    pending_requests: int = 0
    pending_reversals: int = 0
    expired_reversals: int = 0
    fuzzer_rows: int = 0

    def count(self, category: str) -> int:
        return sum(1 for f in self.findings if f.category == category)

    def add(self, category: str, key: str, detail: str) -> None:
        self.findings.append(Finding(category, key, detail))


def mask(card: str) -> str:
    return card[:6] + "*" * max(0, len(card) - 10) + card[-4:]


def read_host_journal(path: Path) -> dict[str, int]:
    """Money the host holds as credited, by retrieval reference (credits less reversals)."""
    credited: dict[str, int] = {}
    reversed_: set[str] = set()
    if not path.exists():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        rrn = str(item.get("rrn", ""))
        if item.get("what") == "credit":
            credited[rrn] = int(item.get("amount_fen", 0))
        elif item.get("what") == "reversal":
            reversed_.add(rrn)
    return {rrn: (0 if rrn in reversed_ else fen) for rrn, fen in credited.items()}


async def reconcile(dsn: str, master_key_hex: str, journal: list[Entry], load_terminals: set[str],
                    cards: list[str], rates: Rates, host_journals: dict[str, Path]) -> Reconciliation:
    out = Reconciliation()
    con = await asyncpg.connect(dsn, server_settings={"default_transaction_read_only": "on"})
    try:
        vault = Vault(bytes.fromhex(master_key_hex))
        await vault.load_data_keys(con)
        card_of = {vault.card_index(c): c for c in cards}
        card_rows = {r["card_index"]: r for r in await con.fetch(
            "SELECT card_index, account_id, points_balance FROM cards WHERE card_index = ANY($1::text[])",
            list(card_of))}
        rows = await con.fetch(
            "SELECT request_id, request_key, operation, state, status, terminal_id, card_index, amount_fen, points,"
            " reversed_at IS NOT NULL AS reversed, shortfall_points, upstream_connector, upstream_reference"
            " FROM requests")
        postings = await con.fetch(
            "SELECT request_id, reason, debit_account_id, credit_account_id, amount_points FROM postings")
        reversals = {r["request_id"]: r for r in await con.fetch(
            "SELECT request_id, state, reason, points_on_ack FROM upstream_reversals")}
    finally:
        await con.close()
    out.rows = len(rows)
    account_of = {r["card_index"]: r["account_id"] for r in card_rows.values()}
    by_key = {r["request_key"]: r for r in rows}
    net: dict[int, int] = defaultdict(int)  # request id -> points it moved onto (+) or off (-) its card
    reasons: dict[int, set[str]] = defaultdict(set)
    request_card = {r["request_id"]: account_of.get(r["card_index"]) for r in rows}
    for p in postings:
        reasons[p["request_id"]].add(p["reason"])
        account = request_card.get(p["request_id"])
        if account is None:
            continue
        if p["credit_account_id"] == account:
            net[p["request_id"]] += p["amount_points"]
        if p["debit_account_id"] == account:
            net[p["request_id"]] -= p["amount_points"]

    # -- request by request ----------------------------------------------------------------------
    expected_by_card: dict[str, int] = defaultdict(int)
    seen_keys: set[str] = set()
    for e in journal:
        if e.op == "inquiry":
            continue
        out.checked_requests += 1
        seen_keys.add(e.key)
        row = by_key.get(e.key)
        what = f"{e.op} {mask(e.card)} {e.amount_fen} fen"
        state = "no row" if row is None else (f"row {row['state']}/{row['status']}"
                                              f"{' reversed' if row['reversed'] else ''}")
        if row is not None and row["state"] == "pending":
            out.add("stuck", e.key, f"{what}: still pending at the end")
        expected = 0
        if e.final == "00":
            points = e.points
            computed = rates.points(e.op, e.amount_fen)
            if points is None:
                points = computed if computed is not None else (row["points"] if row is not None else 0)
            elif computed is not None and computed != points:
                out.add("answer_points", e.key, f"{what}: answered {points} points moved, the rules give {computed}")
            expected = SIGN[e.op] * points
            missing = REQUIRED[e.op] - reasons.get(row["request_id"], set()) if row is not None else set()
            if (row is None or row["state"] != "approved" or row["reversed"]
                    or (points > 0 and missing)):
                out.add("approval_without_posting", e.key,
                        f"{what}: the terminal was told 00 ({points} points); {state}"
                        + (f", postings {sorted(reasons.get(row['request_id'], set()))}" if row is not None else ""))
        elif e.final == "reversed":
            if row is None:
                out.add("reversal_not_recorded", e.key,
                        f"{what}: unanswered, reversal answered {e.reversal_answers[-1]}, but no row remembers it")
            elif not row["reversed"] and row["state"] == "approved":
                out.add("posting_without_approval", e.key,
                        f"{what}: unanswered and reversed (answered {e.reversal_answers[-1]}), yet {state}")
            elif row["state"] == "approved" and e.op in TAKE_BACK:
                expected = row["shortfall_points"]
        elif e.final == "unresolved":
            out.add("stuck", e.key, f"{what}: unanswered, and its reversal was never answered"
                                    f" ({e.reversal_attempts} attempts: {e.reversal_answers[-5:]})")
            if row is not None:
                expected = net.get(row["request_id"], 0)  # unknown to the terminal: counted as stuck only
        else:  # a decline, 96, 98, ...
            if row is not None and row["state"] == "approved" and not row["reversed"]:
                out.add("posting_without_approval", e.key, f"{what}: the terminal was told {e.final}, yet {state}")
        if e.contradiction:
            out.add("contradiction", e.key, f"{what}: {e.contradiction}")
        actual = net.get(row["request_id"], 0) if row is not None else 0
        if actual != expected:
            out.add("request_points", e.key, f"{what}: the terminal's view ({e.final}) means {expected:+d} points"
                                             f" on the card, the ledger moved {actual:+d} ({state})")
        expected_by_card[e.card] += expected

    # rows of load terminals that no terminal knows of
    for row in rows:
        if row["terminal_id"] not in load_terminals:
            if row["card_index"] in card_of:
                expected_by_card[card_of[row["card_index"]]] += net.get(row["request_id"], 0)
            out.fuzzer_rows += 1
            continue
        if row["request_key"] in seen_keys:
            continue
        if row["state"] in ("approved", "pending") and not row["reversed"]:
            out.add("posting_without_approval", row["request_key"],
                    f"{row['operation']} {row['amount_fen']} fen: {row['state']} in the ledger, unknown to every"
                    " terminal's journal")

    # -- card by card ------------------------------------------------------------------------------
    for index, card in card_of.items():
        row = card_rows.get(index)
        if row is None:
            continue
        out.cards_checked += 1
        diff = row["points_balance"] - expected_by_card.get(card, 0)
        if diff > 0:
            out.cards_over += 1
            out.points_doubled += diff
            out.add("card_balance", mask(card), f"balance {row['points_balance']}, the terminals' views add up to"
                                                f" {expected_by_card.get(card, 0)}: {diff} points too many")
        elif diff < 0:
            out.cards_short += 1
            out.points_lost -= diff
            out.add("card_balance", mask(card), f"balance {row['points_balance']}, the terminals' views add up to"
                                                f" {expected_by_card.get(card, 0)}: {-diff} points lost")

    # -- what left through the hosts -------------------------------------------------------------
    for connector, path in host_journals.items():
        host = read_host_journal(path)
        switch: dict[str, int] = {}
        for row in rows:
            if row["upstream_connector"] != connector or not row["upstream_reference"]:
                continue
            rev = reversals.get(row["request_id"])
            undone = rev is not None and rev["state"] == "acknowledged"
            if rev is not None and rev["state"] in ("pending", "expired"):
                out.add("stuck", row["request_key"], f"{connector} reversal ({rev['reason']}) still {rev['state']}")
            paid = row["amount_fen"] if row["state"] == "approved" and not undone else 0
            switch[row["upstream_reference"]] = paid
        mismatched = 0
        for ref in set(switch) | set(host):
            if switch.get(ref, 0) != host.get(ref, 0):
                mismatched += 1
                out.add("paid_vs_credited", f"{connector} 37={ref}",
                        f"the switch paid {switch.get(ref, 0)} fen, the {connector} holds {host.get(ref, 0)} fen")
        out.paid[connector] = {"switch_fen": sum(switch.values()), "host_fen": sum(host.values()),
                               "references": len(switch), "host_references": len(host), "mismatched": mismatched}

    out.pending_requests = sum(1 for r in rows if r["state"] == "pending")
    out.pending_reversals = sum(1 for r in reversals.values() if r["state"] == "pending")
    out.expired_reversals = sum(1 for r in reversals.values() if r["state"] == "expired")
    return out


async def drained(dsn: str) -> tuple[int, int]:
    """(pending requests, pending upstream reversals) now."""
    con = await asyncpg.connect(dsn, server_settings={"default_transaction_read_only": "on"}, timeout=5)
    try:
        pending = await con.fetchval("SELECT count(*) FROM requests WHERE state = 'pending'")
        owed = await con.fetchval("SELECT count(*) FROM upstream_reversals WHERE state = 'pending'")
        return int(pending), int(owed)
    finally:
        await con.close()


def describe(rec: Reconciliation) -> dict[str, Any]:
    return {"checked_requests": rec.checked_requests, "rows": rec.rows, "cards": rec.cards_checked,
            "paid": rec.paid, "findings": len(rec.findings)}
