"""The events that cause messages, each written by a database trigger in the
event's own transaction: accruals group-committed many to a statement, a card
blocked, an upstream payment approved, a day's clearing stored, points about to
expire; and what does not cause one (a decline, a pending payment)."""

from __future__ import annotations

import asyncio
import datetime

from pointswitch.ledger import admin, contacts, days

from .messaging import CARDS, MERCHANT, OTHER_MERCHANT, PHONES, messaging_switch, until

MASKED = ["628866******0017", "628866******0025", "628866******0033"]


async def test_blocking_a_card_tells_the_member_each_time(switch, tmp_path):
    async with messaging_switch(switch, tmp_path) as ms:
        await ms.subscribe(CARDS[2], "sms", PHONES[2], language="en")
        async with ms.running.pool.acquire() as con:
            await admin.set_card_status(con, ms.vault, CARDS[2], "blocked")
            await admin.set_card_status(con, ms.vault, CARDS[2], "active")
            await admin.set_card_status(con, ms.vault, CARDS[2], "blocked")
        got = await until(lambda: len(ms.inbox.to(PHONES[2])) == 2 and ms.inbox.to(PHONES[2]), what="two SMS")
        assert {m["template"] for m in got} == {"card_blocked"}
        assert got[0]["text"] == f"Card {MASKED[2]} has been blocked. If you did not ask for this, call us."


async def test_an_approved_cash_out_and_premium_are_told_and_a_pending_one_is_not(switch, tmp_path):
    async with messaging_switch(switch, tmp_path) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        index = ms.vault.card_index(CARDS[0])
        for n, op in enumerate(("cash_out", "insurance", "cash_out")):
            await ms.fetch(
                "INSERT INTO requests (request_key, operation, state, status, terminal_id, merchant_id, card_index,"
                " amount_fen, points, batch, trace, outcome) VALUES ($1, $2, 'pending', 'pending', 'TMSG0001', $3,"
                " $4, 5000, 500, 1, $5, '{\"points_balance\": 0}')", f"up:{n}", op, MERCHANT, index, 900 + n)
        await asyncio.sleep(0.5)
        assert ms.inbox.received == []  # pending: not told
        await ms.fetch("UPDATE requests SET state = 'approved' WHERE request_key IN ('up:0', 'up:1')")
        await ms.fetch("UPDATE requests SET state = 'declined' WHERE request_key = 'up:2'")
        got = await until(lambda: len(ms.inbox.to(PHONES[0])) == 2 and ms.inbox.to(PHONES[0]), what="two SMS")
        assert sorted(m["template"] for m in got) == ["cash_out", "insurance"]
        assert all(m["params"]["amount"] == "50.00" and m["params"]["points"] == "500" for m in got)
        await asyncio.sleep(0.3)
        assert len(ms.inbox.received) == 2


async def test_points_expiring_soon_are_announced_once_per_card_and_date(switch, tmp_path):
    async with messaging_switch(switch, tmp_path, expiring_warning_days=7) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0], language="en")
        async with ms.terminal() as t:
            for amount in (1_000, 2_000, 3_000, 4_000):
                assert (await t.accrue(CARDS[0], amount)).approved
        [today] = [r["d"] for r in await ms.fetch(
            "SELECT business_date_at(now(), cutoff, time_zone) AS d FROM business_calendar")]
        lots = await ms.fetch("SELECT lot_id FROM point_lots ORDER BY lot_id")
        for lot, days_ahead in zip(lots, (3, 3, 5, 30), strict=True):  # two lots on one date; one too far ahead
            await ms.fetch("UPDATE point_lots SET expires_on = $2 WHERE lot_id = $1", lot["lot_id"],
                           today + datetime.timedelta(days=days_ahead))
        messenger = ms.running.messenger
        assert messenger is not None
        await ms.fetch("DELETE FROM outbox WHERE kind = 'accrual'")
        assert await messenger.queue_warnings() == 2
        assert await messenger.queue_warnings() == 0  # again (another process, the next hour): nothing new
        messenger.wake()

        def warnings():
            got = [m for m in ms.inbox.to(PHONES[0]) if m["template"] == "points_expiring"]
            return len(got) == 2 and got

        got = await until(warnings, what="two warnings")
        by_date = {m["params"]["expires_on"]: m["params"]["points"] for m in got}
        assert by_date == {str(today + datetime.timedelta(days=3)): "30", str(today + datetime.timedelta(days=5)): "30"}
        assert got[0]["template"] == "points_expiring" and MASKED[0] in got[0]["text"]


async def test_a_merchant_gets_its_clearing_statement_by_signed_webhook_when_the_day_closes(switch, tmp_path):
    secret = "merchant-webhook-secret-0001"
    async with messaging_switch(switch, tmp_path, secrets={MERCHANT: secret.encode()}) as ms:
        async with ms.running.pool.acquire() as con:
            await contacts.add_merchant_contact(con, ms.vault, MERCHANT, "webhook", ms.inbox.webhook_url(MERCHANT),
                                                secret=secret, language="en")
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 30_000)).approved  # 300 points at 0.5 fen each
        closed = await days.close_day(ms.running.pool, ms.running.ledger, clearing_dir=ms.clearing_dir)
        [hook] = await until(lambda: ms.inbox.to(MERCHANT), what="the clearing statement")
        assert hook["kind"] == "clearing_statement" and hook["signature_ok"]
        assert hook["data"]["business_date"] == closed.report["business_date"]
        data = hook["data"]
        assert (data["points_issued"], data["issue_fee_fen"], data["net_fen"]) == (300, 150, -150)
        assert hook["text"].startswith(f"Messages shop ({MERCHANT}) clearing of {closed.report['business_date']}")
        assert ms.inbox.to(OTHER_MERCHANT) == []  # no contact, nothing sent
        assert ms.inbox.refused == []


async def test_a_burst_of_accruals_group_committed_together_queues_one_message_per_approved_request(switch, tmp_path):
    async with messaging_switch(switch, tmp_path) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        await ms.subscribe(CARDS[1], "sms", PHONES[1])  # CARDS[2] has no contact

        async def burst(n: int) -> list[bool]:
            async with ms.terminal() as t:  # 30 in flight on one connection: the writers batch them
                replies = await asyncio.gather(*(t.accrue(CARDS[i % 3], 100 * (n + 1) + i) for i in range(30)))
            return [r.approved for r in replies]

        approved = await burst(0)
        assert all(approved)
        batches = await ms.fetch("SELECT count(DISTINCT xmin::text) AS n FROM requests WHERE operation = 'accrue'")
        expected = {PHONES[0]: 10, PHONES[1]: 10}
        got = await until(lambda: all(len(ms.inbox.to(p)) == n for p, n in expected.items()) and ms.inbox.received,
                          what="one message per accrual of a subscribed member")
        await asyncio.sleep(0.5)
        assert len(ms.inbox.received) == 20 == len({m["key"] for m in got})
        rows = await ms.fetch("SELECT r.card_index, count(o.message_id) AS n FROM requests r"
                              " LEFT JOIN outbox o ON o.request_id = r.request_id GROUP BY r.card_index")
        counts = {r["card_index"]: r["n"] for r in rows}
        assert [counts[ms.vault.card_index(c)] for c in CARDS] == [10, 10, 0]
        assert batches[0]["n"] < 30, "the accruals were written in shared transactions (group commit)"


async def test_a_declined_request_and_a_rolled_back_one_queue_nothing(switch, tmp_path):
    async with messaging_switch(switch, tmp_path) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        async with ms.running.pool.acquire() as con:
            await admin.set_card_status(con, ms.vault, CARDS[0], "blocked")  # one message: card blocked
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 1_000)).rc == "62"  # declined: logged, no message
            assert (await t.redeem(CARDS[1], 999_999)).rc == "51"  # another card, too few points
        con = await ms.running.pool.acquire()
        try:
            tx = con.transaction()
            await tx.start()
            await con.execute(
                "INSERT INTO requests (request_key, operation, state, status, terminal_id, merchant_id, card_index,"
                " points, batch, trace, outcome) VALUES ('rolled:1', 'accrue', 'approved', 'approved', 'TMSG0001',"
                " $1, $2, 10, 1, 999, '{}')", MERCHANT, ms.vault.card_index(CARDS[0]))
            assert len(await con.fetch("SELECT 1 FROM outbox WHERE kind = 'accrual'")) == 1  # inside: queued
            await tx.rollback()
        finally:
            await ms.running.pool.release(con)
        rows = await ms.outbox()
        assert [r["kind"] for r in rows] == ["card_blocked"]
