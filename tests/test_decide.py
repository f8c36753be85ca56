"""The pure decision of an accrual (``ledger.decide``), against an independent model,
thousands of cases without sockets or a database; and group commit over TCP:
many connections, the same cards, retransmissions inside one batch."""

from __future__ import annotations

import asyncio
import datetime
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pointswitch.ledger.decide import decide_accrual
from pointswitch.ledger.model import ExpiryRule, Posting, RequestKey, Status

from .test_idempotency import _postings

DAY = datetime.date(2026, 11, 25)


def _ctx(**over: Any) -> dict[str, Any]:
    ctx = {"terminal_status": "active", "merchant_id": "M1", "merchant_status": "active", "current_batch": 7,
           "card_status": "active", "earn_rate": Decimal("1.5"), "redeem_value": Decimal("2"), "rrn": "000000000042",
           "business_date": DAY}
    ctx.update(over)
    return ctx


def _accrual(amount: int, batch: int = 7, merchant: str = "M1") -> Posting:
    return Posting("T1", merchant, RequestKey("T1", batch, 1), "6288000000000000", amount, _op())


def _op() -> Any:
    from pointswitch.ledger.model import Operation

    return Operation.ACCRUE


def model(ctx: dict[str, Any], amount: int, batch: int, merchant: str, balance: int) -> tuple[str, int, int | None]:
    """What an accrual must do, written from PROTOCOL.md and the issue's words:
    (response status, points added, balance told)."""
    if ctx["terminal_status"] is None:
        return "unknown_terminal", 0, None
    if merchant != ctx["merchant_id"] or ctx["merchant_status"] != "active":
        return "wrong_merchant", 0, None
    if ctx["terminal_status"] != "active":
        return "terminal_disabled", 0, None
    if batch != ctx["current_batch"]:
        return "batch_mismatch", 0, None
    if ctx["card_status"] is None:
        return "unknown_card", 0, None
    if ctx["card_status"] != "active":
        return "blocked_card", 0, None
    if amount <= 0:
        return "invalid_amount", 0, None
    points = (amount * int(ctx["earn_rate"] * 10000)) // (100 * 10000)  # floor(fen x rate / 100)
    return "approved", points, balance + points


@settings(max_examples=3000, deadline=None)
@given(amount=st.integers(-5, 10**9), batch=st.sampled_from([6, 7]), merchant=st.sampled_from(["M1", "M2"]),
       balance=st.integers(0, 10**9), rate=st.decimals("0", "50", places=4),
       terminal=st.sampled_from(["active", "disabled", None]), merchant_status=st.sampled_from(["active", "suspended"]),
       card=st.sampled_from(["active", "blocked", None]))
def test_an_accrual_decides_as_the_model_says(amount, batch, merchant, balance, rate, terminal, merchant_status,
                                               card):
    ctx = _ctx(earn_rate=rate, terminal_status=terminal, merchant_status=merchant_status, card_status=card)
    decision = decide_accrual(ctx, _accrual(amount, batch, merchant), balance=balance, dated=None,
                              expiry=ExpiryRule(), host_time="t", auth_code="123456")
    status, points, told = model(ctx, amount, batch, merchant, balance)
    o = decision.outcome
    assert (o.status.value, decision.points, o.points_balance if o.approved else None) == (status, points, told)
    assert decision.logged == (status in ("unknown_card", "blocked_card", "invalid_amount", "approved"))
    if o.approved:
        assert o.points_moved == points and o.cash_value_fen == told * 2 and o.business_date == "2026-11-25"
        assert (o.rrn, o.auth_code) == ("000000000042", "123456")


@settings(max_examples=500, deadline=None)
@given(dated=st.none() | st.tuples(st.dates(DAY, DAY + datetime.timedelta(days=2000)), st.integers(1, 10**6)),
       months=st.integers(1, 60), amount=st.integers(1, 10**7))
def test_an_accrual_tells_the_member_what_expires_first(dated, months, amount):
    decision = decide_accrual(_ctx(earn_rate=Decimal(1)), _accrual(amount), balance=0, dated=dated,
                              expiry=ExpiryRule("months", months=months), host_time="t", auth_code="1")
    mine = decision.expires_on
    assert mine is not None and mine > DAY
    told = decision.outcome.extra.get("next_expiry")
    candidates = ([dated] if dated else []) + ([(mine, decision.points)] if decision.points else [])
    if not candidates:
        assert told is None
        return
    soonest = min(d for d, _ in candidates)
    assert told == {"date": soonest.isoformat(), "points": sum(p for d, p in candidates if d == soonest)}


async def test_group_commit_keeps_every_card_exact_under_many_connections_and_retransmissions(network):
    """16 connections of one terminal session accrue on 3 cards at once, each request
    sent twice at the same time on two connections: every key posts once, every
    answer to a key is the same, and the cards hold exactly the sum."""
    terms = [network.terminal(0, sign_on=i == 0) for i in range(16)]
    for t in terms:
        await t.connect()
    for t in terms[1:]:
        t.pik, t.mak = terms[0].pik, terms[0].mak
    try:
        requests = [terms[0].request("accrue", network.cards[i % 3], 1000 * (1 + i % 7)) for i in range(48)]
        sends = []
        for i, request in enumerate(requests):
            sends.append(terms[i % 16].send(request))
            sends.append(terms[(i + 5) % 16].send(request))  # the retransmission, at once, elsewhere
        replies = await asyncio.gather(*sends)
    finally:
        for t in terms:
            await t.close()
    assert {r.rc for r in replies} == {"00"}
    for i in range(48):
        first, again = replies[2 * i], replies[2 * i + 1]
        assert (first.rrn, first.fields.get("63")) == (again.rrn, again.fields.get("63"))
    for c in range(3):
        expected = sum(10 * (1 + i % 7) for i in range(48) if i % 3 == c)
        assert await network.balance(network.cards[c]) == expected
        assert await _postings(network, network.cards[c]) == 16


async def test_two_accruals_of_one_card_in_one_batch_tell_the_running_balance_and_expiry(network):
    """Decided in arrival order against what the card has so far in the batch: the
    second of two accruals on one card is told the balance and the soonest expiry
    with the first one's points in them."""
    import asyncpg

    from pointswitch.ledger import GroupCommit, Ledger, Operation

    pool = await asyncpg.create_pool(network.dsn, min_size=1, max_size=3)
    ledger = Ledger(pool, network.vault, expiry=ExpiryRule("months", months=24),
                    group_commit=GroupCommit(writers=1, max_batch=8, queue_size=16))
    await ledger.start(lambda: asyncpg.connect(network.dsn))
    try:
        tid, card = network.terminal_ids[0], network.cards[0]
        first, second = await asyncio.gather(*(
            ledger.execute(Posting(tid, network.merchant_id, RequestKey(tid, 1, 900 + i), card, 1000 * (i + 1),
                                   Operation.ACCRUE)) for i in range(2)))
    finally:
        await ledger.stop()
        await pool.close()
    assert (first.status, second.status) == (Status.APPROVED, Status.APPROVED)
    assert (first.points_balance, second.points_balance) == (10, 30)
    assert first.extra["next_expiry"]["points"] == 10 and second.extra["next_expiry"]["points"] == 30
    assert first.extra["next_expiry"]["date"] == second.extra["next_expiry"]["date"]
