"""Every operation and every decline code, end to end over TCP, on both dialects."""

from __future__ import annotations

import asyncpg

from pointswitch.codecs.subfields import parse_54
from pointswitch.ledger import admin


async def test_sign_on_answers_with_the_terminals_current_batch(network, dialect):
    async with network.terminal(0, dialect) as term:
        term.batch = 0
        reply = await term.sign_on()
    assert reply.rc == "00"
    assert reply.fields["t"] == "0810"
    assert reply.fields["60"][2:8] == "000001"
    assert reply.fields["60"][8:11] == "003"


async def test_sign_off_and_echo_are_answered(network, dialect):
    async with network.terminal(0, dialect) as term:
        echo = await term.echo()
        off = await term.sign_off()
    assert (echo.fields["t"], echo.rc) == ("0830", "00")
    assert (off.fields["t"], off.rc) == ("0830", "00")
    con = await network.db()
    try:
        row = await con.fetchrow("SELECT signed_off_at FROM terminals WHERE terminal_id = $1",
                                 network.terminal_id(0, dialect))
    finally:
        await con.close()
    assert row["signed_off_at"] is not None


async def test_sign_on_from_an_unknown_terminal_is_declined_97(network, dialect):
    term = network.terminal(0, dialect)
    term.terminal_id = "ZZ999999"
    async with term:
        reply = await term.sign_on()
    assert reply.rc == "97"


async def test_accrual_earns_floor_of_amount_times_rate_and_echoes_what_terminals_check(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        reply = await term.accrue(card, 12399)
    assert reply.rc == "00"
    assert reply.fields["t"] == "0210"
    for f in ("3", "4", "11", "41", "42"):
        assert reply.fields[f] == reply.request[f], f"field {f} not echoed"
    assert reply.points_moved == 123  # floor(12399 * 1 / 100)
    assert reply.points_balance == 123
    assert reply.cash_value_fen == 123
    assert len(reply.fields["37"]) == 12 and reply.fields["37"].isdigit()
    assert len(reply.fields["38"]) == 6
    assert len(reply.fields["12"]) == 6 and len(reply.fields["13"]) == 4
    entries = parse_54(reply.fields["54"])
    assert [(e.currency, e.amount) for e in entries] == [("999", 123), ("156", 123)]
    assert await network.balance(card) == 123


async def test_fractional_earn_rate_rounds_down(network_factory, dialect):
    net = await network_factory(earn_rate="1.5")
    async with net.terminal(0, dialect) as term:
        reply = await term.accrue(net.cards[0], 333)  # 3.33 yuan * 1.5 = 4.995 points
    assert reply.rc == "00"
    assert reply.points_moved == 4


async def test_one_balance_across_merchants(network_factory, dialect):
    a = await network_factory(earn_rate="1")
    b = await network_factory(earn_rate="3")
    card = a.cards[0]
    async with a.terminal(0, dialect) as ta, b.terminal(0, dialect) as tb:
        r1 = await ta.accrue(card, 10000)
        r2 = await tb.accrue(card, 10000)
        inquiry = await tb.inquiry(card)
    assert (r1.points_moved, r2.points_moved) == (100, 300)
    assert inquiry.rc == "00"
    assert inquiry.points_balance == 400
    assert "63" not in inquiry.fields


async def test_redemption_spends_points_rounded_up(network_factory, dialect):
    net = await network_factory(redeem_value="2")  # one point pays 2 fen here
    card = net.cards[0]
    async with net.terminal(0, dialect) as term:
        await term.accrue(card, 100000)  # 1000 points
        reply = await term.redeem(card, 501)  # 250.5 points -> 251
    assert reply.rc == "00"
    assert reply.points_moved == 251
    assert reply.points_balance == 749
    assert reply.cash_value_fen == 1498


async def test_redemption_beyond_the_balance_is_declined_51_and_posts_nothing(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        await term.accrue(card, 5000)
        reply = await term.redeem(card, 5001)
    assert reply.rc == "51"
    assert reply.points_balance is None, "a decline carries no balance"
    assert await network.balance(card) == 50


async def test_void_of_an_accrual_takes_the_points_back(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        original = await term.accrue(card, 7000)
        void = await term.void(original)
        again = await term.void(original)
    assert void.rc == "00"
    assert void.points_moved == 70
    assert void.points_balance == 0
    assert again.rc == "22", "a voided original cannot be voided again"


async def test_void_of_a_redemption_gives_the_points_back(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        await term.accrue(card, 10000)
        spent = await term.redeem(card, 40)
        void = await term.void(spent)
    assert void.rc == "00"
    assert void.points_balance == 100


async def test_void_declines(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        original = await term.accrue(card, 1000)
        unknown = term.request("void_accrual", card, 1000, **{"61": "000001999999", "37": "000000000000"})
        r_unknown = await term.send(unknown)
        wrong_amount = term.request("void_accrual", card, 999,
                                    **{"61": "000001" + original.request["11"], "37": original.rrn})
        r_amount = await term.send(wrong_amount)
        settled = await term.settle()  # the switch opens the next batch
        await term.sign_on()
        r_batch = await term.void(original)
    assert r_unknown.rc == "25"
    assert r_amount.rc == "64"
    assert settled.rc == "00" and r_batch.request["60"][2:8] == "000002"
    assert r_batch.rc == "22", "void must be in the same batch as its original"


async def test_void_of_a_reversed_original_is_declined_22(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        original = await term.accrue(card, 1000)
        await term.reverse(original.request)
        void = await term.void(original)
    assert void.rc == "22"


async def test_void_after_the_points_were_spent_takes_back_what_is_left_of_the_accrual(network, dialect):
    """Lots (migration 0011): a void of an accrual is no longer declined 51 when its
    points were spent; it takes back what is left of the accrual's lot, and the rest
    is recorded as the void's shortfall."""
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        original = await term.accrue(card, 1000)  # 10 points, its own lot
        await term.redeem(card, 5)
        void = await term.void(original)
    assert void.rc == "00"
    assert void.points_moved == 5
    assert await network.balance(card) == 0
    con = await network.db()
    try:
        shortfall = await con.fetchval("SELECT shortfall_points FROM requests WHERE rrn = $1", void.rrn)
    finally:
        await con.close()
    assert shortfall == 5


async def test_partial_refunds_claw_back_pro_rata_rounded_up_never_more_than_earned(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        original = await term.accrue(card, 10000)  # 100 points
        first = await term.refund(original, 3333)  # 33.33 -> 34
        second = await term.refund(original, 3333)  # cumulative 66.66 -> 67: 33 more
        too_much = await term.refund(original, 3335)  # 3334 left
        last = await term.refund(original, 3334)  # the rest: 100 - 67 = 33
    assert (first.rc, first.points_moved) == ("00", 34)
    assert (second.rc, second.points_moved) == ("00", 33)
    assert too_much.rc == "64"
    assert (last.rc, last.points_moved, last.points_balance) == ("00", 33, 0)
    assert first.fields["t"] == "0230"


async def test_refund_never_takes_a_balance_below_zero(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        original = await term.accrue(card, 10000)
        await term.redeem(card, 90)  # 10 points left
        refund = await term.refund(original, 10000)
    assert refund.rc == "00"
    assert refund.points_moved == 10
    assert refund.points_balance == 0


async def test_refund_of_an_unknown_original_is_declined_25(network, dialect):
    async with network.terminal(0, dialect) as term:
        reply = await term.send(term.request("refund", network.cards[0], 100, **{"61": "0000019999991125"}))
    assert reply.rc == "25"


async def test_reversal_of_each_financial_operation_restores_the_balance(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        base = await term.accrue(card, 50000)  # 500
        assert base.points_balance == 500
        acc = await term.accrue(card, 1000)
        assert (await term.reverse(acc.request)).points_balance == 500
        red = await term.redeem(card, 100)
        assert (await term.reverse(red.request)).points_balance == 500
        acc2 = await term.accrue(card, 2000)
        void = await term.void(acc2)
        assert void.points_balance == 500
        rev_void = await term.reverse(void.request)
        assert rev_void.points_balance == 520, "reversing the void reinstates the accrual"
        red2 = await term.redeem(card, 20)
        void2 = await term.void(red2)
        rev_void2 = await term.reverse(void2.request)
        assert rev_void2.points_balance == 500
        refund = await term.refund(acc2, 1000)
        assert refund.points_balance == 490
        rev_refund = await term.reverse(refund.request)
        assert rev_refund.points_balance == 500
        assert rev_refund.fields["t"] == "0410"
    assert await network.balance(card) == 500


async def test_card_and_terminal_declines(network, dialect):
    card = network.cards[0]
    con = await network.db()
    try:
        await admin.set_card_status(con, network.vault, network.cards[1], "blocked")
        await admin.set_terminal_status(con, network.terminal_id(1, dialect), "disabled")
    finally:
        await con.close()
    async with network.terminal(0, dialect) as term, network.terminal(1, dialect) as disabled:
        unknown_card = await term.accrue("6299999999999999999", 1000)
        blocked = await term.accrue(network.cards[1], 1000)
        blocked_inquiry = await term.inquiry(network.cards[1])
        zero = await term.accrue(card, 0)
        at_disabled = await disabled.accrue(card, 1000)
    async with network.terminal(0, dialect, merchant_id=network.other_merchant_id) as wrong_merchant:
        other = await wrong_merchant.accrue(card, 1000)
    stranger = network.terminal(0, dialect)
    stranger.terminal_id = "XX000001"
    async with stranger:
        unregistered = await stranger.accrue(card, 1000)
    assert unknown_card.rc == "14"
    assert blocked.rc == "62"
    assert blocked_inquiry.rc == "62"
    assert zero.rc == "13"
    assert at_disabled.rc == "58"
    assert other.rc == "03"
    assert unregistered.rc == "97"
    assert await network.balance(card) == 0


async def test_unknown_and_unsupported_operations(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        unknown_proc = term.request("accrue", card, 100)
        unknown_proc["3"] = "990000"
        r_unknown = await term.send(unknown_proc)
        unknown_type = term.request("accrue", card, 100)
        unknown_type["60"] = "99" + unknown_type["60"][2:]
        r_type = await term.send(unknown_type)
        to_card = term.base_fields("0200", "400000", "53")
        to_card.update({"2": card, "4": "000000000100", "48": "6222020000000000000"})
        r_to_card = await term.send(to_card)
    assert r_unknown.rc == "12"
    assert r_type.rc == "12"
    assert r_to_card.rc == "40"


async def test_missing_or_malformed_fields_get_format_error_30(network, dialect):
    card = network.cards[0]
    async with network.terminal(0, dialect) as term:
        no_amount = term.request("accrue", card)
        r_no_amount = await term.send(no_amount)
        short_60 = term.request("accrue", card, 100)
        short_60["60"] = "22"
        r_short = await term.send(short_60)
        bad_61 = term.request("void_accrual", card, 100, **{"61": "0001"})
        r_bad_61 = await term.send(bad_61)
        still_fine = await term.accrue(card, 100)
    assert r_no_amount.rc == "30"
    assert r_short.rc == "30"
    assert r_bad_61.rc == "30"
    assert still_fine.rc == "00"
    assert r_no_amount.fields["11"] == no_amount["11"], "a format error still echoes the trace"


async def test_requests_on_one_connection_are_answered_as_they_complete(network, dialect):
    import asyncio

    async with network.terminal(0, dialect) as term:
        replies = await asyncio.gather(*(term.accrue(network.cards[i % 3], 100 * (i + 1)) for i in range(12)))
    assert all(r.rc == "00" for r in replies)
    assert sorted(r.fields["11"] for r in replies) == sorted(r.request["11"] for r in replies)


async def test_unknown_card_decline_is_logged_for_idempotency(network):
    async with network.terminal(0) as term:
        request = term.request("accrue", "6299999999999999999", 1000)
        first = await term.send(request)
        second = await term.send(request)
    assert first.rc == second.rc == "14"
    assert first.rrn == second.rrn
    con: asyncpg.Connection = await network.db()
    try:
        n = await con.fetchval("SELECT count(*) FROM requests WHERE terminal_id = $1", network.terminal_ids[0])
    finally:
        await con.close()
    assert n == 1
