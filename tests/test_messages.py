"""Messages to members and merchants, end to end: a request over TCP, the outbox
row its transaction wrote, the worker that ``serve`` runs, and what the local
catcher (SMS gateway, SMTP server, merchant webhook) received."""

from __future__ import annotations

import asyncio
import datetime
import json
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import structlog

from pointswitch.ledger import contacts, outbox
from pointswitch.ledger.errors import AdminError

from .messaging import CARDS, MERCHANT, PHONES, messaging_switch, until

MASKED = ["628866******0017", "628866******0025", "628866******0033"]
SHANGHAI = ZoneInfo("Asia/Shanghai")


async def _delivered(ms, n: int = 1):
    rows = [r for r in await ms.outbox() if r["delivered_at"] is not None]
    return rows if len(rows) >= n else None


async def test_an_accrual_and_a_redemption_over_tcp_reach_the_member_once_each_with_the_card_masked(switch, tmp_path):
    async with messaging_switch(switch, tmp_path) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 12_300)).approved  # group-committed: 123 points
            assert (await t.redeem(CARDS[0], 20)).approved  # one transaction of its own: 20 points at 1 fen
            assert (await t.accrue(CARDS[1], 5_000)).approved  # a member with no contact: nothing queued
        got = await until(lambda: len(ms.inbox.to(PHONES[0])) >= 2 and ms.inbox.to(PHONES[0]), what="two SMS")
        await asyncio.sleep(0.6)  # the worker polls and is woken a few more times: nothing more arrives
        assert len(ms.inbox.received) == 2
        accrual, redemption = sorted(got, key=lambda m: m["template"])
        assert accrual["template"] == "accrual" and redemption["template"] == "redemption"
        assert accrual["params"]["card"] == MASKED[0] and accrual["params"]["points"] == "123"
        assert accrual["params"]["merchant"] == "Messages shop" and accrual["sign_name"] == "积分联盟"
        assert redemption["params"]["points"] == "20" and redemption["params"]["balance"] == "103"
        assert MASKED[0] in accrual["text"] and "123" in accrual["text"]
        assert all(CARDS[0] not in json.dumps(m, ensure_ascii=False) for m in got)
        assert all(ms.inbox.attempts[m["key"]] == 1 for m in got)
        rows = await ms.outbox()
        assert len(rows) == 2 and all(r["delivered_at"] and r["attempts"] == 1 for r in rows)
        assert {r["idempotency_key"] for r in rows} == {m["key"] for m in got}
        assert ms.running.web is not None and ms.running.web.bound is not None
        host, port = ms.running.web.bound
        async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}/metrics") as resp:
            metrics = await resp.text()
        delivered = [line for line in metrics.splitlines()
                     if line.startswith('pointswitch_messages_delivered_total{channel="sms"}')]
        assert delivered and float(delivered[0].split()[-1]) >= 2


async def test_a_failing_gateway_is_tried_again_with_growing_waits_and_the_message_arrives_once(switch, tmp_path):
    async with messaging_switch(switch, tmp_path, backoff_initial_s=0.2, backoff_max_s=5.0) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        ms.inbox.fail_next["sms"] = 3  # 503, three times
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 1_000)).approved
        [row] = await until(lambda: _delivered(ms), what="delivery")
        assert row["attempts"] == 4 and row["last_error"] is None
        # Waits of 0.2, 0.4 and 0.8 s, each at least 75 % of that (jitter).
        assert (row["delivered_at"] - row["created_at"]).total_seconds() >= 0.75 * (0.2 + 0.4 + 0.8)
        assert len(ms.inbox.to(PHONES[0])) == 1 and ms.inbox.attempts[row["idempotency_key"]] == 1


async def test_a_gateway_down_for_good_fails_the_message_after_max_attempts_and_an_operator_retries_it(
        switch, tmp_path):
    async with messaging_switch(switch, tmp_path, max_attempts=3) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        ms.inbox.fail_next["sms"] = 1000
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 1_000)).approved

        async def failed():
            rows = await ms.outbox()
            return rows[0] if rows and rows[0]["failed_at"] else None

        row = await until(failed, what="the message given up")
        assert row["attempts"] == 3 and "503" in row["last_error"] and not ms.inbox.received
        async with ms.running.pool.acquire() as con:
            listed = await outbox.list_messages(con, failed=True)
            assert [m["message_id"] for m in listed] == [row["message_id"]]
            assert listed[0]["recipient"] == MASKED[0] and listed[0]["address"] == "***0017"
            ms.inbox.fail_next["sms"] = 0
            retried = await outbox.retry(con, row["message_id"])
            assert retried["state"] == "waiting"
        [done] = await until(lambda: _delivered(ms), what="delivery after the retry")
        assert done["message_id"] == row["message_id"] and len(ms.inbox.to(PHONES[0])) == 1


async def test_a_worker_that_dies_between_the_send_and_its_commit_neither_loses_nor_repeats_the_message(
        switch, tmp_path):
    async with messaging_switch(switch, tmp_path) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        crashes = []

        async def crash(record):  # the gateway took it; the worker's connection dies before it commits
            if crashes:
                return
            own = await asyncpg.connect(ms.dsn)
            try:
                crashes.extend(await own.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE relation = 'outbox'::regclass"
                    " AND mode = 'RowShareLock' AND pid <> pg_backend_pid()"))
            finally:
                await own.close()

        ms.inbox.on_receive = crash
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 1_000)).approved
        [row] = await until(lambda: _delivered(ms), what="delivery after the crash")
        assert crashes, "the worker's transaction was cut"
        assert ms.inbox.attempts[row["idempotency_key"]] == 2  # sent twice, under one key ...
        assert len(ms.inbox.to(PHONES[0])) == 1  # ... taken once


async def test_a_member_who_opted_out_is_sent_nothing_even_for_a_message_already_queued(switch, tmp_path):
    async with messaging_switch(switch, tmp_path) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        async with ms.running.pool.acquire() as con:
            await contacts.set_card_opt_in(con, ms.vault, CARDS[0], "sms", False)
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 1_000)).approved
            assert await ms.outbox() == []  # nothing queued for an opted-out contact

            # Queued while opted in, opted out before the worker got to it: given up, not sent.
            messenger = ms.running.messenger
            assert messenger is not None
            await messenger.stop()
            async with ms.running.pool.acquire() as con:
                await contacts.set_card_opt_in(con, ms.vault, CARDS[0], "sms", True)
            assert (await t.accrue(CARDS[0], 1_000)).approved
            async with ms.running.pool.acquire() as con:
                await contacts.set_card_opt_in(con, ms.vault, CARDS[0], "sms", False)
            await messenger.start()

        async def given_up():
            rows = await ms.outbox()
            return rows and rows[0]["failed_at"] and rows[0]

        row = await until(given_up, what="the message dropped")
        assert row["last_error"] == "the recipient opted out" and row["attempts"] == 0
        assert ms.inbox.received == []


async def test_quiet_hours_hold_a_members_message_until_they_end(switch, tmp_path):
    async with messaging_switch(switch, tmp_path, quiet_hours_start="22:00", quiet_hours_end="08:00") as ms:
        messenger = ms.running.messenger
        assert messenger is not None
        night = datetime.datetime(2026, 3, 1, 23, 30, tzinfo=SHANGHAI)
        messenger.now = lambda: night
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 1_000)).approved

        async def held():
            rows = await ms.outbox()
            return rows and rows[0]["not_before"] and rows[0]

        row = await held() or await until(held, what="the message held")
        assert row["not_before"] == datetime.datetime(2026, 3, 2, 8, 0, tzinfo=SHANGHAI)
        assert row["last_error"] == "quiet hours" and row["attempts"] == 0
        await asyncio.sleep(0.5)
        assert ms.inbox.received == []
        # Morning comes (the row falls due, the clock says 08:30): it goes out.
        messenger.now = lambda: datetime.datetime(2026, 3, 2, 8, 30, tzinfo=SHANGHAI)
        await ms.fetch("UPDATE outbox SET next_attempt_at = now()")
        messenger.wake()
        await until(lambda: _delivered(ms), what="delivery after the quiet hours")
        assert len(ms.inbox.to(PHONES[0])) == 1


async def test_a_recipient_gets_at_most_the_rate_limit_per_hour_and_the_rest_waits(switch, tmp_path):
    async with messaging_switch(switch, tmp_path, rate_limit_per_hour=2) as ms:
        await ms.subscribe(CARDS[0], "sms", PHONES[0])
        await ms.subscribe(CARDS[1], "sms", PHONES[1])
        async with ms.terminal() as t:
            for _ in range(3):
                assert (await t.accrue(CARDS[0], 1_000)).approved
            assert (await t.accrue(CARDS[1], 1_000)).approved  # another recipient is not held up

        async def settled():
            rows = await ms.outbox()
            return len(rows) == 4 and all(r["delivered_at"] or r["last_error"] for r in rows) and rows

        rows = await until(settled, what="three delivered, one held")
        held = [r for r in rows if r["delivered_at"] is None]
        assert len(held) == 1 and held[0]["last_error"] == "rate limit (2 per hour)"
        first = min(r["delivered_at"] for r in rows if r["recipient_ref"] == held[0]["recipient_ref"]
                    and r["delivered_at"])
        assert held[0]["next_attempt_at"] == first + datetime.timedelta(hours=1)
        assert len(ms.inbox.to(PHONES[0])) == 2 and len(ms.inbox.to(PHONES[1])) == 1


async def test_an_english_speaking_member_gets_an_email_whose_message_id_is_the_key(switch, tmp_path):
    async with messaging_switch(switch, tmp_path) as ms:
        await ms.subscribe(CARDS[1], "email", "li.na@example.com", language="en")
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[1], 4_500)).approved
        [mail] = await until(lambda: ms.inbox.to("li.na@example.com"), what="the e-mail")
        [row] = await until(lambda: _delivered(ms), what="the e-mail marked delivered")
        assert mail["subject"] == "Points earned"
        assert mail["text"] == f"Card {MASKED[1]} earned 45 points at Messages shop. Balance: 45 points."
        assert mail["key"] == f"<{row['idempotency_key'].replace(':', '.')}@pointswitch>"


async def test_no_clear_card_number_or_address_is_stored_beside_a_message_or_logged(switch, tmp_path):
    with structlog.testing.capture_logs() as logged:
        async with messaging_switch(switch, tmp_path) as ms:
            await ms.subscribe(CARDS[0], "sms", PHONES[0])
            await ms.subscribe(CARDS[1], "email", "secret.member@example.com")
            ms.inbox.fail_next["sms"] = 1  # a failure is logged too
            async with ms.terminal() as t:
                assert (await t.accrue(CARDS[0], 1_000)).approved
                assert (await t.accrue(CARDS[1], 1_000)).approved
            await until(lambda: _delivered(ms, 2), what="both delivered")
            stored = [dict(r) for r in await ms.outbox()] + [dict(r) for r in await ms.fetch(
                "SELECT contact_id, recipient_ref, address_display, language FROM contacts")]
    text = json.dumps(stored, default=str) + json.dumps(logged, default=str)
    for clear in (*CARDS, PHONES[0], "secret.member@example.com"):
        assert clear not in text
    assert any(e.get("event") == "message not delivered; trying again" for e in logged)


async def test_messages_for_a_channel_switched_off_wait_until_max_age_and_are_given_up(switch, tmp_path):
    async with messaging_switch(switch, tmp_path, smtp_host="", max_age_s=1.0, expiring_check_interval_s=0.2) as ms:
        await ms.subscribe(CARDS[0], "email", "off@example.com")  # e-mail is off: no SMTP server configured
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 1_000)).approved

        async def given_up():
            rows = await ms.outbox()
            return rows and rows[0]["failed_at"] and rows[0]

        row = await until(given_up, what="the message given up")
        assert row["last_error"] == "not delivered within max_age_s" and row["attempts"] == 0
        assert (row["failed_at"] - row["created_at"]).total_seconds() >= 1.0
        assert ms.inbox.received == []


async def test_contacts_refuse_what_is_not_an_address_and_webhooks_need_a_long_secret(switch, tmp_path):
    async with messaging_switch(switch, tmp_path) as ms:
        async with ms.running.pool.acquire() as con:
            for channel, address in (("sms", "call me"), ("email", "nobody"), ("webhook", "ftp://x")):
                try:
                    await contacts.add_merchant_contact(con, ms.vault, MERCHANT, channel, address,
                                                        secret="x" * 20 if channel == "webhook" else None)
                except AdminError:
                    continue
                raise AssertionError(f"{channel} {address!r} accepted")
            for secret in (None, "short"):
                try:
                    await contacts.add_merchant_contact(con, ms.vault, MERCHANT, "webhook", "https://shop.example/h",
                                                        secret=secret)
                except AdminError:
                    continue
                raise AssertionError(f"webhook with secret {secret!r} accepted")
            try:
                await contacts.add_card_contact(con, ms.vault, CARDS[0], "webhook", "https://x.example/")
            except AdminError:
                pass
            else:
                raise AssertionError("a member's webhook accepted")
