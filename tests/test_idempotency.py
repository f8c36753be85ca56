"""Retransmissions, duplicates, reversals exactly once, and concurrency on one card."""

from __future__ import annotations

import asyncio

from pointswitch.simulators.terminal import TerminalClient


async def _postings(network, card: str) -> int:
    con = await network.db()
    try:
        return int(await con.fetchval(
            "SELECT count(*) FROM postings p JOIN cards c"
            " ON c.account_id IN (p.debit_account_id, p.credit_account_id) WHERE c.card_index = $1",
            network.card_index(card)))
    finally:
        await con.close()


async def test_retransmitted_accrual_posts_once_and_gets_the_stored_response(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        request = term.request("accrue", card, 2500)
        first = await term.send(request)
        second = await term.send(request)
    assert first.rc == second.rc == "00"
    for f in ("37", "38", "54", "63", "12", "13"):
        assert first.fields[f] == second.fields[f], f"field {f} differs on the retransmission"
    assert await network.balance(card) == 25
    assert await _postings(network, card) == 1


async def test_same_key_with_different_content_is_declined_94(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        request = term.request("accrue", card, 2500)
        first = await term.send(request)
        changed = dict(request, **{"4": "000000009900"})
        second = await term.send(changed)
    assert first.rc == "00"
    assert second.rc == "94"
    assert await network.balance(card) == 25


async def test_simultaneous_retransmissions_on_several_connections_post_once(network):
    card = network.cards[0]
    terms = [network.terminal(0, sign_on=i == 0) for i in range(5)]
    for t in terms:
        await t.connect()
    for t in terms[1:]:  # one terminal, one session, several connections
        t.pik, t.mak = terms[0].pik, terms[0].mak
    try:
        request = terms[0].request("accrue", card, 10000)
        replies = await asyncio.gather(*(t.send(request) for t in terms))
    finally:
        for t in terms:
            await t.close()
    assert {r.rc for r in replies} == {"00"}
    assert len({r.rrn for r in replies}) == 1
    assert await network.balance(card) == 100
    assert await _postings(network, card) == 1


async def test_reversal_acts_exactly_once(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        await term.accrue(card, 10000)
        original = await term.accrue(card, 5000)
        first = await term.reverse(original.request)
        second = await term.reverse(original.request)
    assert first.rc == second.rc == "00"
    assert first.points_moved == second.points_moved == 50
    assert await network.balance(card) == 100


async def test_reversal_before_its_original_is_remembered_and_the_late_original_is_not_posted(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        request = term.request("accrue", card, 5000)
        reversal = await term.reverse(request)
        late = await term.send(request)
        again = await term.reverse(request)
    assert reversal.rc == "00"
    assert late.rc == "22", "the late original must not be approved"
    assert again.rc == "00"
    assert await network.balance(card) == 0
    assert await _postings(network, card) == 0


async def test_reversal_of_a_declined_original_posts_nothing(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        declined = await term.redeem(card, 100)
        assert declined.rc == "51"
        reversal = await term.reverse(declined.request)
    assert reversal.rc == "00"
    assert await _postings(network, card) == 0


async def test_reversal_of_an_accrual_already_spent_takes_what_is_there(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        original = await term.accrue(card, 10000)
        await term.redeem(card, 80)
        reversal = await term.reverse(original.request)
    assert reversal.rc == "00"
    assert reversal.points_moved == 20
    assert await network.balance(card) == 0
    con = await network.db()
    try:
        shortfall = await con.fetchval(
            "SELECT shortfall_points FROM requests WHERE rrn = $1", original.rrn)
    finally:
        await con.close()
    assert shortfall == 80, "what could not be clawed back is recorded for the operator"


async def test_fifty_concurrent_accruals_on_one_card_from_many_connections(network_factory):
    net = await network_factory(terminals=10, cards=1)
    card = net.cards[0]
    clients: list[TerminalClient] = [net.terminal(i % 10, "cup" if i % 2 else "iso87") for i in range(10)]
    for c in clients:
        await c.connect()
    try:
        replies = await asyncio.gather(*(clients[i % 10].accrue(card, 100 * (i + 1)) for i in range(50)))
    finally:
        for c in clients:
            await c.close()
    assert [r.rc for r in replies] == ["00"] * 50
    expected = sum(range(1, 51))  # 100 fen * (i+1) at 1 point per yuan
    assert await net.balance(card) == expected
    assert max(r.points_balance for r in replies) == expected
    assert sorted(r.points_balance for r in replies) == sorted({r.points_balance for r in replies})
    assert await net.invariants() == []


async def test_reversing_a_voided_accrual_and_then_its_void_leaves_nothing(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        await term.accrue(card, 10000)  # 100, stays
        original = await term.accrue(card, 5000)  # 50
        void = await term.void(original)
        rev_original = await term.reverse(original.request)
        rev_void = await term.reverse(void.request)
    assert void.points_balance == 100
    assert (rev_original.rc, rev_original.points_moved, rev_original.points_balance) == ("00", 0, 100), \
        "the void already undid the accrual"
    assert (rev_void.rc, rev_void.points_moved, rev_void.points_balance) == ("00", 0, 100), \
        "the accrual the void undid is itself reversed"


async def test_reversing_a_refund_after_its_accrual_was_reversed_gives_nothing_back(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        original = await term.accrue(card, 10000)
        refund = await term.refund(original, 5000)  # -50
        rev_original = await term.reverse(original.request)  # -50 more: 0
        rev_refund = await term.reverse(refund.request)
    assert rev_original.points_balance == 0
    assert (rev_refund.points_moved, rev_refund.points_balance) == (0, 0)
