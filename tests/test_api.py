"""The JSON API over real HTTP, against the session switch: same rules and codes as
the ISO operations, signed requests, idempotency on the ledger's own request key.
Every answer is checked against the OpenAPI description (tests/api_support.py)."""

from __future__ import annotations

import asyncio
import json
import time

from pointswitch.ledger import admin
from pointswitch.web.api.guard import sign

from .api_support import api_client, base_url, postings_of, request
from .conftest import TEST_PIN


async def test_accrual_then_balance(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    accrued = await api.post("/accrue", {"card": card, "amount_fen": 12399})
    assert accrued.status == 200 and accrued.code == "00", accrued.body
    assert accrued.body["points"] == 123 and accrued.body["points_balance"] == 123
    assert len(accrued.body["rrn"]) == 12 and len(accrued.body["auth_code"]) == 6
    inquired = await api.post("/inquire", {"card": card, "pin": TEST_PIN})
    assert inquired.code == "00" and inquired.body["points_balance"] == 123
    assert await network.balance(card) == 123


async def test_redeem_with_insufficient_points_is_51_and_posts_nothing(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    assert (await api.post("/accrue", {"card": card, "amount_fen": 1000})).code == "00"  # 10 points
    before = await postings_of(network, api.terminal_id)
    short = await api.post("/redeem", {"card": card, "amount_fen": 11, "pin": TEST_PIN})  # 1 fen a point
    assert short.status == 200 and short.code == "51"
    assert "points_balance" not in short.body
    assert await postings_of(network, api.terminal_id) == before
    spent = await api.post("/redeem", {"card": card, "amount_fen": 10, "pin": TEST_PIN})
    assert spent.code == "00" and spent.body["points_balance"] == 0


async def test_wrong_pin_is_55(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    await api.post("/accrue", {"card": card, "amount_fen": 1000})
    wrong = await api.post("/redeem", {"card": card, "amount_fen": 5, "pin": "999999"})
    assert wrong.code == "55"
    assert await network.balance(card) == 10


async def test_blocked_card_is_declined_62(switch, network):
    api = await api_client(switch, network)
    card = network.cards[1]
    await api.post("/accrue", {"card": card, "amount_fen": 1000})
    con = await network.db()
    try:
        await admin.set_card_status(con, switch.vault, card, "blocked")
    finally:
        await con.close()
    refused = await api.post("/redeem", {"card": card, "amount_fen": 5, "pin": TEST_PIN})
    assert refused.code == "62"
    assert await network.balance(card) == 10


async def test_wrong_signature_is_401_and_posts_nothing(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    body = {"card": card, "amount_fen": 5000}
    forged = await api.post("/accrue", body, sign_with=b"\x00" * 32)
    assert forged.status == 401 and forged.code == "A0"
    # A signature made for one body (or one Idempotency-Key) does not pass another.
    ts = str(int(time.time()))
    signed = sign(api.key, "POST", "/api/v1/accrue", ts, "sig-1", json.dumps(body).encode())
    for other_body, other_key in (({"card": card, "amount_fen": 700000}, "sig-1"), (body, "sig-2")):
        moved = await api.call("POST", "/accrue", other_body, idempotency_key=other_key, timestamp=int(ts),
                               signature=signed)
        assert moved.status == 401
    # Not an API terminal (a POS of the same merchant), or no terminal at all: the same 401.
    for terminal in (network.terminal_ids[0], "NOSUCH01"):
        stranger = await api.call("POST", "/accrue", body, idempotency_key="x", headers={"X-Terminal": terminal})
        assert stranger.status == 401
    assert await postings_of(network, api.terminal_id) == 0
    assert await network.balance(card) == 0


async def test_stale_or_future_timestamp_is_refused(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    for skew in (-301, 301):
        late = await api.post("/accrue", {"card": card, "amount_fen": 1000}, timestamp=int(time.time()) + skew)
        assert late.status == 401 and late.code == "A0"
    assert await network.balance(card) == 0


async def test_replayed_inquiry_signature_is_refused(switch, network):
    api = await api_client(switch, network)
    ts = int(time.time())
    first = await api.post("/inquire", {"card": network.cards[0], "pin": TEST_PIN}, timestamp=ts)
    assert first.status == 200 and first.code == "00"
    replayed = await api.post("/inquire", {"card": network.cards[0], "pin": TEST_PIN}, timestamp=ts)
    assert replayed.status == 401


async def test_idempotent_retry_gets_the_same_answer_and_posts_once(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    body = {"card": card, "amount_fen": 2500}
    first = await api.post("/accrue", body, idempotency_key="order-1")
    later = int(time.time()) + 1  # a retry is signed afresh ...
    again = await api.post("/accrue", body, idempotency_key="order-1", timestamp=later)
    replay = await api.post("/accrue", body, idempotency_key="order-1", timestamp=later)  # ... or replayed as is
    assert first.code == "00"
    assert again.body == first.body and replay.body == first.body
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert await network.balance(card) == 25
    con = await network.db()
    try:
        rows = await con.fetch("SELECT request_key FROM requests WHERE terminal_id = $1", api.terminal_id)
        mapped = await con.fetchval("SELECT count(*) FROM api_requests WHERE terminal_id = $1", api.terminal_id)
    finally:
        await con.close()
    assert len(rows) == 1 and mapped == 1
    assert await postings_of(network, api.terminal_id) == 1


async def test_same_key_different_body_is_94(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    assert (await api.post("/accrue", {"card": card, "amount_fen": 2500}, idempotency_key="order-2")).code == "00"
    other = await api.post("/accrue", {"card": card, "amount_fen": 2600}, idempotency_key="order-2")
    assert other.status == 200 and other.code == "94"
    also = await api.post("/redeem", {"card": card, "amount_fen": 100, "pin": TEST_PIN}, idempotency_key="order-2")
    assert also.code == "94"
    assert await network.balance(card) == 25


async def test_two_concurrent_identical_requests_post_once(switch, network):
    api = await api_client(switch, network)
    card = network.cards[2]
    body = {"card": card, "amount_fen": 4200}
    for round_ in range(5):
        answers = await asyncio.gather(*(api.post("/accrue", body, idempotency_key=f"same-{round_}")
                                         for _ in range(2)))
        assert [a.code for a in answers] == ["00", "00"]
        assert answers[0].body == answers[1].body
    assert await network.balance(card) == 5 * 42
    assert await postings_of(network, api.terminal_id) == 5


async def test_void_and_refund_name_the_original_by_its_idempotency_key(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    await api.post("/accrue", {"card": card, "amount_fen": 10000}, idempotency_key="sale-1")
    await api.post("/accrue", {"card": card, "amount_fen": 5000}, idempotency_key="sale-2")
    refunded = await api.post("/refund", {"card": card, "amount_fen": 4000, "original": "sale-1"})
    assert refunded.code == "00" and refunded.body["points_balance"] == 110
    voided = await api.post("/void", {"card": card, "amount_fen": 5000, "original": "sale-2"})
    assert voided.code == "00" and voided.body["points_balance"] == 60
    unknown = await api.post("/void", {"card": card, "amount_fen": 5000, "original": "never-sent"})
    assert unknown.code == "25"
    assert await network.balance(card) == 60


async def test_malformed_bodies_are_400_with_code_30(switch, network):
    api = await api_client(switch, network)
    for body in ({"card": "12", "amount_fen": 1}, {"card": network.cards[0], "amount_fen": -5},
                 {"card": network.cards[0], "amount_fen": 1.5}, {"card": network.cards[0]},
                 {"card": network.cards[0], "amount_fen": 1, "extra": True}, [1, 2]):
        answer = await api.post("/accrue", body)
        assert answer.status == 400 and answer.code == "30", body
    no_key = await api.call("POST", "/accrue", {"card": network.cards[0], "amount_fen": 100})
    assert no_key.status == 400
    assert await network.balance(network.cards[0]) == 0


async def test_a_pos_over_tcp_and_the_api_see_one_balance(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    async with network.terminal(0) as pos:
        assert (await pos.accrue(card, 3000)).rc == "00"
        via_api = await api.post("/accrue", {"card": card, "amount_fen": 2000})
        assert via_api.body["points_balance"] == 50
        spent = await api.post("/redeem", {"card": card, "amount_fen": 15, "pin": TEST_PIN})
        assert spent.body["points_balance"] == 35
        seen_by_pos = await pos.inquiry(card)
    assert seen_by_pos.rc == "00" and seen_by_pos.points_balance == 35


async def test_an_api_terminal_is_refused_on_the_iso_listener(switch, network):
    api = await api_client(switch, network, n=0)  # the POS terminal 0 becomes an API terminal
    async with network.terminal(0, sign_on=False) as pos:
        refused = await pos.sign_on()
    assert refused.rc == "58"
    assert (await api.post("/accrue", {"card": network.cards[0], "amount_fen": 100})).code == "00"


async def test_a_disabled_api_terminal_is_refused_58(switch, network):
    api = await api_client(switch, network)
    con = await network.db()
    try:
        await admin.set_terminal_status(con, api.terminal_id, "disabled")
    finally:
        await con.close()
    for _ in range(50):  # the switch learns of the change by NOTIFY
        refused = await api.post("/accrue", {"card": network.cards[0], "amount_fen": 100})
        if refused.status == 403:
            break
        await asyncio.sleep(0.05)
    assert refused.status == 403 and refused.code == "58"


async def test_openapi_description_is_served(switch):
    answer = await _get(switch, "/api/v1/openapi.json")
    assert answer["openapi"].startswith("3.1")
    assert {"/accrue", "/redeem", "/void", "/refund", "/inquire", "/member/login", "/member/token",
            "/member/balance", "/member/expiry", "/member/history"} <= set(answer["paths"])


async def _get(switch, path):
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(base_url(switch) + path) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_body_past_max_body_bytes_is_413(switch, network):
    api = await api_client(switch, network)
    import aiohttp

    big = b"{" + b" " * (switch.config.http.max_body_bytes + 10) + b"}"
    async with aiohttp.ClientSession() as http, http.post(api.base + "/api/v1/accrue", data=big,
                                                              headers={"X-Terminal": api.terminal_id,
                                                                       "X-Timestamp": str(int(time.time())),
                                                                       "X-Signature": "00"}) as resp:
        assert resp.status == 413


async def test_member_cannot_use_a_card_it_does_not_hold(switch, network):
    """Member endpoints take the card from the token alone."""
    for path in ("/api/v1/member/balance", "/api/v1/member/expiry", "/api/v1/member/history"):
        answer = await request(base_url(switch), "GET", path, headers={"Authorization": "Bearer nothing.here"})
        assert answer.status == 401


async def test_concurrent_identical_redemptions_post_once(switch, network):
    api = await api_client(switch, network)
    card = network.cards[1]
    await api.post("/accrue", {"card": card, "amount_fen": 10000})  # 100 points
    body = {"card": card, "amount_fen": 30, "pin": TEST_PIN}
    answers = await asyncio.gather(*(api.post("/redeem", body, idempotency_key="pay-1") for _ in range(3)))
    assert {a.code for a in answers} == {"00"} and len({json.dumps(a.body) for a in answers}) == 1
    assert await network.balance(card) == 70


async def test_an_idempotency_key_belongs_to_its_terminal(switch, network):
    shop, other = await api_client(switch, network, n=1), await api_client(switch, network, n=0)
    card = network.cards[0]
    assert (await shop.post("/accrue", {"card": card, "amount_fen": 1000}, idempotency_key="o-1")).code == "00"
    # The same key from another terminal is another request; and it cannot void the first one.
    assert (await other.post("/accrue", {"card": card, "amount_fen": 1000}, idempotency_key="o-1")).code == "00"
    assert await network.balance(card) == 20
    stolen = await other.post("/void", {"card": card, "amount_fen": 1000, "original": "o-1"})
    assert stolen.code == "00"  # it voids its own o-1 ...
    assert (await shop.post("/void", {"card": card, "amount_fen": 1000, "original": "o-1"})).code == "00"
    assert await network.balance(card) == 0  # ... and each void undid its own terminal's accrual once
    again = await other.post("/void", {"card": card, "amount_fen": 1000, "original": "o-1"})
    assert again.code == "22"  # already voided: not eligible


async def test_a_stalled_database_answers_96_posts_nothing_and_the_retry_posts_once(switch, network):
    api = await api_client(switch, network)
    card = network.cards[2]
    body = {"card": card, "amount_fen": 7700}
    con = await network.db()
    try:
        tx = con.transaction()
        await tx.start()
        await con.execute("SELECT 1 FROM cards WHERE card_index = $1 FOR UPDATE", network.card_index(card))
        stalled = await api.post("/accrue", body, idempotency_key="stall-1")
        await tx.rollback()
    finally:
        await con.close()
    assert stalled.status == 503 and stalled.code == "96"
    assert await network.balance(card) == 0
    retried = await api.post("/accrue", body, idempotency_key="stall-1")
    assert retried.code == "00" and retried.body["points_balance"] == 77
    assert await postings_of(network, api.terminal_id) == 1


def test_admin_terminal_api_key_prints_the_key_once_and_rotates_it(switch, network_factory):
    from .test_cli import _cli

    net = asyncio.run(network_factory())
    tid = net.terminal_ids[0]
    env = {"POINTSWITCH_MASTER_KEY": switch.master_key_hex}
    first = _cli("admin", "terminal", "api-key", tid, "--dsn", switch.dsn, env=env).stdout
    second = _cli("admin", "terminal", "api-key", tid, "--dsn", switch.dsn, env=env).stdout
    keys = [line.split()[2] for line in (first + second).splitlines() if line.startswith("API key ")]
    assert len(keys) == 2 and keys[0] != keys[1] and all(len(k) == 64 for k in keys)
    con_rows = asyncio.run(_stored(switch.dsn, tid))
    assert con_rows["generation"] == 2
    assert keys[1].encode() not in con_rows["sealed"] and bytes.fromhex(keys[1]) not in con_rows["sealed"]

    async def both() -> tuple[int, int]:
        from .api_support import ApiClient

        old = ApiClient(base_url(switch), tid, bytes.fromhex(keys[0]))
        new = ApiClient(base_url(switch), tid, bytes.fromhex(keys[1]))
        body = {"card": net.cards[0], "amount_fen": 100}
        return (await old.post("/accrue", body)).status, (await new.post("/accrue", body)).status

    assert asyncio.run(both()) == (401, 200)


async def _stored(dsn: str, tid: str) -> dict[str, object]:
    import asyncpg

    con = await asyncpg.connect(dsn)
    try:
        row = await con.fetchrow("SELECT generation, key_sealed FROM api_keys WHERE terminal_id = $1", tid)
        return {"generation": row["generation"], "sealed": bytes(row["key_sealed"])}
    finally:
        await con.close()


async def test_an_api_key_past_its_rate_is_answered_429(switch, network):
    api = await api_client(switch, network)
    rules = switch.config.api
    started = time.monotonic()
    # Malformed bodies: the rate is checked after the signature and before anything else.
    answers = await asyncio.gather(*(api.post("/accrue", {"card": "1"}) for _ in range(rules.burst_per_key + 30)))
    elapsed = time.monotonic() - started
    statuses = [a.status for a in answers]
    assert statuses.count(429) >= 1 and {a.code for a in answers if a.status == 429} == {"65"}
    assert statuses.count(400) <= rules.burst_per_key + rules.requests_per_s_per_key * elapsed + 1
    other = await api_client(switch, network, n=0)  # another key has its own rate
    assert (await other.post("/accrue", {"card": network.cards[0], "amount_fen": 100})).code == "00"


async def test_a_void_of_a_redemption_gives_the_points_back(switch, network):
    api = await api_client(switch, network)
    card = network.cards[1]
    await api.post("/accrue", {"card": card, "amount_fen": 5000})
    paid = await api.post("/redeem", {"card": card, "amount_fen": 20, "pin": TEST_PIN}, idempotency_key="pay-9")
    assert paid.body["points_balance"] == 30
    voided = await api.post("/void", {"card": card, "amount_fen": 20, "original": "pay-9"})
    assert voided.code == "00" and voided.body["operation"] == "void_redemption"
    assert voided.body["points_balance"] == 50


async def test_a_batch_with_every_trace_drawn_refuses_new_keys_and_still_answers_old_ones(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    body = {"card": card, "amount_fen": 1000}
    first = await api.post("/accrue", body, idempotency_key="before-full")
    con = await network.db()
    try:
        await con.execute("UPDATE api_traces SET last_trace = 999999 WHERE terminal_id = $1", api.terminal_id)
    finally:
        await con.close()
    full = await api.post("/accrue", body, idempotency_key="after-full")
    assert full.status == 503 and full.code == "96"
    assert (await api.post("/accrue", body, idempotency_key="before-full")).body == first.body
    assert await network.balance(card) == 10 and await postings_of(network, api.terminal_id) == 1


async def test_drawing_a_trace_commits_asynchronously_and_only_that_transaction(switch, network):
    """The mapping's commit needs no flush of its own (the posting's flushes it, decision 48)."""
    from pointswitch.ledger.api import _MAP, MAX_TRACE

    api = await api_client(switch, network)
    con = await network.db()
    try:
        async with con.transaction():
            row = await con.fetchrow(_MAP, api.terminal_id, "probe-1", MAX_TRACE)
            assert row is not None and not row["full"] and row["trace"] >= 1
            assert await con.fetchval("SELECT current_setting('synchronous_commit')") == "off"
        assert await con.fetchval("SELECT current_setting('synchronous_commit')") == "on"
    finally:
        await con.close()
