"""Hypothesis hunts for operation sequences that break a ledger invariant.

After every step the balance a response reports must equal the card's balance
in the database; after every sequence the invariants of ARCHITECTURE.md hold:
postings sum to zero, balances equal journal sums, no key posted twice, no
negative balance, every approved posting request has its posting.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointswitch.ledger.service import clawback_due, earned_points
from pointswitch.simulators.terminal import Reply, TerminalClient

from .conftest import make_network
from .test_lots import Lots

OPS = ["accrue", "accrue", "accrue", "redeem", "void", "void", "refund", "reverse", "reverse",
       "retransmit", "reverse_first", "new_batch", "inquiry"]

step = st.tuples(
    st.sampled_from(OPS),
    st.integers(0, 1),  # terminal (0: cup, 1: iso87)
    st.integers(0, 2),  # card
    st.integers(0, 30000),  # amount in fen
    st.integers(0, 1000),  # which earlier transaction
)


class Model:
    """An independent reference of what the network must answer: response code and
    card balance for every step (earn rate 1 point per yuan, 1 fen per point)."""

    def __init__(self) -> None:
        self.balance: dict[str, int] = {}
        self.lots: dict[str, Lots] = {}  # points never expire here: lots in earning order
        self.txns: dict[tuple[str, int, int], dict] = {}
        self.batch: dict[str, int] = {}  # each terminal's open batch (the switch's)

    def take_lot(self, card: str, o: dict, wanted: int) -> list[list[int]]:
        """What is left of an accrual's own lot, up to ``wanted``."""
        lots = self.lots[card]
        if o.get("lot") is None or wanted <= 0:
            return []
        take = min(wanted, lots.lots[o["lot"]][2])
        lots.lots[o["lot"]][2] -= take
        return [[o["lot"], take]] if take else []

    @staticmethod
    def key(req: dict[str, str]) -> tuple[str, int, int]:
        return (req["41"].strip(), int(req["60"][2:8]), int(req["11"]))

    def apply(self, op: str, req: dict[str, str]) -> str:
        """Predict the response code of ``req`` and update the model."""
        card = req["2"]
        rc = self._apply(op, req, card)
        self.balance[card] = self.lots[card].balance
        return rc

    def _apply(self, op: str, req: dict[str, str], card: str) -> str:
        lots = self.lots.setdefault(card, Lots())
        bal = lots.balance
        k = self.key(req)
        open_batch = self.batch.get(k[0], 1)
        if req["t"] == "0400":
            return "77" if k[1] != open_batch else self._reverse(k, op, card)
        if k in self.txns:  # retransmission: answered from the log, whatever the batch
            t = self.txns[k]
            return "22" if t["state"] == "placeholder" else t["rc"]
        if k[1] != open_batch:
            return "77"  # not logged: nothing posted
        amount = int(req.get("4", "0"))
        t = {"op": op, "card": card, "amount": amount, "points": 0, "state": "declined",
             "voided": False, "reversed": False, "refunded": 0, "clawed": 0, "batch": k[1], "orig": None,
             "lot": None, "draws": []}
        rc = "00"
        if amount <= 0:
            rc = "13"
        elif op == "accrue":
            t["points"] = amount // 100
            t["lot"] = lots.add(None, t["points"]) if t["points"] else None
        elif op == "redeem":
            t["points"] = amount
            if bal < amount:
                rc = "51"
            else:
                t["draws"] = lots.draw(amount)
        elif op in ("void_accrual", "void_redemption"):
            ok = "accrue" if op == "void_accrual" else "redeem"
            ok_key = (k[0], int(req["61"][:6]), int(req["61"][6:12]))
            o = self.txns.get(ok_key)
            if o is None or o["state"] == "placeholder" or o["op"] != ok or o["card"] != card:
                rc = "25"
            elif o["state"] != "approved" or o["voided"] or o["reversed"] or o["batch"] != k[1] or o["refunded"]:
                rc = "22"
            elif o["amount"] != amount:
                rc = "64"
            elif op == "void_accrual":  # what is left of the accrual's lot (no 51 since lots)
                t["draws"] = self.take_lot(card, o, o["points"])
                t["points"] = sum(p for _, p in t["draws"])
                o["voided"] = True
                t["orig"] = ok_key
            else:
                t["points"] = o["points"]
                lots.give_back(o["draws"], o["points"])
                o["voided"] = True
                t["orig"] = ok_key
        elif op == "refund":
            ok_key = (k[0], int(req["61"][:6]), int(req["61"][6:12]))
            o = self.txns.get(ok_key)
            if o is None or o["state"] == "placeholder" or o["op"] != "accrue" or o["card"] != card:
                rc = "25"
            elif o["state"] != "approved" or o["voided"] or o["reversed"]:
                rc = "22"
            elif amount > o["amount"] - o["refunded"]:
                rc = "64"
            else:
                due = clawback_due(o["points"], o["amount"], o["refunded"] + amount, o["clawed"])
                t["draws"] = self.take_lot(card, o, due)
                take = t["points"] = sum(p for _, p in t["draws"])
                o["refunded"] += amount
                o["clawed"] += take
                t["orig"] = ok_key
        t["rc"] = rc
        t["state"] = "approved" if rc == "00" else "declined"
        self.txns[k] = t
        return rc

    def _reverse(self, k: tuple[str, int, int], op: str, card: str) -> str:
        t = self.txns.get(k)
        if t is None:
            self.txns[k] = {"op": op, "card": card, "state": "placeholder", "reversed": True, "rc": "00"}
            return "00"
        if t["reversed"]:
            return "00"
        if t["op"] != op or t["card"] != card:
            return "25"
        t["reversed"] = True
        if t["state"] != "approved":
            return "00"
        o = self.txns.get(t["orig"]) if t["orig"] else None
        if (o is not None and o["reversed"]) or (t["op"] in ("accrue", "redeem") and t["voided"]):
            return "00"
        lots = self.lots[card]
        if t["op"] == "accrue":
            t["draws"] += self.take_lot(card, t, t["points"] - t["clawed"])
        elif t["op"] == "void_redemption":
            o["draws"] = lots.draw(min(t["points"], lots.balance))
        else:
            lots.give_back(t["draws"], t["points"])
        if t["op"] in ("void_accrual", "void_redemption"):
            o["voided"] = False
        elif t["op"] == "refund":
            o["refunded"] -= t["amount"]
            o["clawed"] -= t["points"]
        return "00"


_OP_OF_TYPE = {"22": "accrue", "51": "redeem", "23": "void_accrual", "52": "void_redemption",
               "25": "refund", "01": "inquiry"}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(step, min_size=1, max_size=30))
def test_random_operation_sequences_keep_the_ledger_invariants(switch, steps):
    asyncio.run(_run(switch, steps))


async def _run(switch, steps) -> None:
    net = await make_network(switch)
    terms = [net.terminal(0, "cup"), net.terminal(1, "iso87")]
    history: list[tuple[TerminalClient, Reply]] = []
    model = Model()
    for t in terms:
        await t.connect()
    try:
        for op, ti, ci, amount, pick in steps:
            term, card = terms[ti], net.cards[ci]
            # Mostly recent transactions, so chains like accrue -> void -> reverse occur often.
            past = history[-1 - pick % min(len(history), 3)] if history else None
            reply: Reply | None = None
            replayed = False
            sender = term
            if op == "accrue":
                reply = await term.accrue(card, amount)
            elif op == "redeem":
                reply = await term.redeem(card, amount // 50)
            elif op == "inquiry":
                reply = await term.inquiry(card)
            elif op == "new_batch":  # settle (the switch opens the next batch), sign on to learn it
                await term.settle()
                await term.sign_on()
                model.batch[term.terminal_id] = term.batch
            elif past is None:
                continue
            elif op == "void":
                sender, original = past
                if original.request["60"][:2] in ("22", "51"):
                    reply = await sender.void(original)
            elif op == "refund":
                sender, original = past
                if original.request["60"][:2] == "22":
                    reply = await sender.refund(original, amount % (int(original.request["4"]) + 1) or 1)
            elif op == "reverse":
                sender, original = past
                reply = await sender.reverse(original.request)
                replayed = True  # a second reversal returns the stored answer
            elif op == "retransmit":
                sender, original = past
                reply = await sender.send(original.request)
                replayed = True
            elif op == "reverse_first":
                request = term.request("accrue", card, amount or 1)
                rev = await term.reverse(request)
                assert rev.rc == model.apply("accrue", dict(request, t="0400")) == "00"
                late = await term.send(request)
                assert late.rc == model.apply("accrue", request) == "22", "a late original must not post"
            if reply is None:
                continue
            assert reply.rc not in ("30", "96"), f"{op}: {reply.rc}"
            kind = _OP_OF_TYPE[reply.request["60"][:2]]
            if kind != "inquiry":
                expected_rc = model.apply(kind, reply.request)
                assert reply.rc == expected_rc, f"{op} {kind}: got {reply.rc}, model says {expected_rc}"
            for c in net.cards:
                assert await net.balance(c) == model.balance.get(c, 0), f"after {op} {kind}: balance of card differs"
            if reply.request["t"] != "0400" and reply.fields["t"] != "0410" and not replayed:
                history.append((sender, reply))
            if reply.approved and not replayed and reply.points_balance is not None:
                card_of_reply = reply.request["2"]
                assert reply.points_balance == await net.balance(card_of_reply), (
                    f"{op}: response says {reply.points_balance}, ledger says {await net.balance(card_of_reply)}"
                )
    finally:
        for t in terms:
            await t.close()
    assert await net.invariants() == []
    con = await net.db()
    try:
        twice = await con.fetchval(
            "SELECT count(*) FROM (SELECT request_id, reason FROM postings GROUP BY 1, 2 HAVING count(*) > 1) x")
        negative = await con.fetchval("SELECT count(*) FROM cards WHERE points_balance < 0")
    finally:
        await con.close()
    assert twice == 0
    assert negative == 0


@given(amount=st.integers(0, 10**12), rate_hundredths=st.integers(0, 100000))
def test_earned_points_is_floor_of_amount_times_rate_over_100(amount, rate_hundredths):
    from decimal import Decimal

    rate = Decimal(rate_hundredths) / 100
    points = earned_points(amount, rate)
    assert points * 10000 <= amount * rate_hundredths < (points + 1) * 10000


@given(points=st.integers(0, 10**6), amount=st.integers(1, 10**8), data=st.data())
def test_cumulative_clawback_never_exceeds_the_points_earned(points, amount, data):
    refunds = data.draw(st.lists(st.integers(1, amount), max_size=6))
    refunded, clawed = 0, 0
    for r in refunds:
        if refunded + r > amount:
            continue
        refunded += r
        due = clawback_due(points, amount, refunded, clawed)
        assert due >= 0
        clawed += due
        # rounded in the network's favour: at least the exact pro-rata share
        assert clawed * amount >= points * refunded
        assert clawed <= points
    if refunded == amount:
        assert clawed == points
