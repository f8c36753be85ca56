"""Members' side of the JSON API over real HTTP: a one-time code, then a token that
reads its own card only."""

from __future__ import annotations

import asyncpg

from pointswitch.ledger.members import delivered_code

from .api_support import api_client, base_url, request
from .conftest import TEST_PIN


async def _code(switch, card: str) -> str | None:
    con = await asyncpg.connect(switch.dsn)
    try:
        return await delivered_code(con, switch.vault, switch.vault.card_index(card))
    finally:
        await con.close()


async def _login(switch, card: str) -> str:
    base = base_url(switch)
    sent = await request(base, "POST", "/api/v1/member/login", b'{"card": "%s"}' % card.encode())
    assert sent.status == 202
    code = await _code(switch, card)
    assert code is not None and len(code) == 6 and code.isdigit()
    answer = await request(base, "POST", "/api/v1/member/token", b'{"card": "%s", "code": "%s"}'
                           % (card.encode(), code.encode()))
    assert answer.status == 200, answer.body
    return str(answer.body["token"])


async def _get(switch, path: str, token: str):
    return await request(base_url(switch), "GET", path, headers={"Authorization": f"Bearer {token}"})


async def test_member_logs_in_with_a_code_and_reads_balance_expiry_and_history(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    await api.post("/accrue", {"card": card, "amount_fen": 4000})
    await api.post("/redeem", {"card": card, "amount_fen": 15, "pin": TEST_PIN})
    token = await _login(switch, card)
    balance = await _get(switch, "/api/v1/member/balance", token)
    assert balance.body["points_balance"] == 25 and balance.body["status"] == "active"
    assert balance.body["card"] != card and balance.body["card"].endswith(card[-4:])  # masked
    expiry = await _get(switch, "/api/v1/member/expiry", token)
    assert sum(expiry.body["expiring"].values()) + expiry.body["never_expiring"] == 25
    history = await _get(switch, "/api/v1/member/history?limit=10", token)
    assert [(p["operation"], p["points"]) for p in history.body["postings"]] == [("redeem", -15), ("accrue", 40)]
    assert card not in str(history.body)


async def test_a_token_reads_only_its_own_card(switch, network):
    api = await api_client(switch, network)
    mine, theirs = network.cards[0], network.cards[1]
    await api.post("/accrue", {"card": mine, "amount_fen": 1000})
    await api.post("/accrue", {"card": theirs, "amount_fen": 7000})
    token = await _login(switch, mine)
    assert (await _get(switch, "/api/v1/member/balance", token)).body["points_balance"] == 10
    # The card is the token's: a query naming another card changes nothing ...
    other = await _get(switch, f"/api/v1/member/balance?card={theirs}", token)
    assert other.body["points_balance"] == 10
    # ... and a token whose payload is edited to another card does not verify.
    import base64
    import json

    payload, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["card_index"] = switch.vault.card_index(theirs)
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert (await _get(switch, "/api/v1/member/balance", f"{edited}.{mac}")).status == 401
    assert (await _get(switch, "/api/v1/member/history", "")).status == 401


async def test_login_answers_the_same_for_an_unknown_card_and_sends_nothing(switch, network):
    unknown = "6299999999999999"
    answer = await request(base_url(switch), "POST", "/api/v1/member/login", b'{"card": "%s"}' % unknown.encode())
    assert answer.status == 202
    assert await _code(switch, unknown) is None


async def test_a_code_is_good_once_and_wrong_codes_lock_the_card_out(switch, network):
    card = network.cards[2]
    base = base_url(switch)
    token = await _login(switch, card)
    assert token
    code = await _code(switch, card)
    reused = await request(base, "POST", "/api/v1/member/token",
                           b'{"card": "%s", "code": "%s"}' % (card.encode(), str(code).encode()))
    assert reused.status == 401 and reused.code == "55"
    rules = switch.config.api
    answers = []
    for _ in range(rules.member_max_failures - 1):  # the reused code was the first wrong one
        wrong = await request(base, "POST", "/api/v1/member/token", b'{"card": "%s", "code": "000000"}'
                              % card.encode())
        answers.append(wrong.code)
    assert answers[-1] == "75" and set(answers[:-1]) == {"55"}
    # Locked: even a fresh, right code is refused until the lockout ends (no code is sent meanwhile).
    con = await asyncpg.connect(switch.dsn)
    try:
        await con.execute("UPDATE member_codes SET sent_at = NULL WHERE card_index = $1",
                          switch.vault.card_index(card))
    finally:
        await con.close()
    before = await _code(switch, card)
    await request(base, "POST", "/api/v1/member/login", b'{"card": "%s"}' % card.encode())
    assert await _code(switch, card) == before
    locked = await request(base, "POST", "/api/v1/member/token", b'{"card": "%s", "code": "%s"}'
                           % (card.encode(), str(before).encode()))
    assert locked.status == 401 and locked.code == "75"


async def test_codes_are_never_stored_in_clear(switch, network):
    card = network.cards[1]
    await _login(switch, card)
    code = await _code(switch, card)
    con = await asyncpg.connect(switch.dsn)
    try:
        rows = await con.fetch("SELECT * FROM member_codes UNION ALL SELECT NULL, NULL, NULL, 0, 0, NULL, NULL")
        deliveries = await con.fetch("SELECT code_sealed FROM member_code_deliveries")
    finally:
        await con.close()
    assert code is not None
    for row in rows:
        assert code not in str(dict(row))
    assert all(code.encode() not in bytes(d["code_sealed"]) for d in deliveries)


async def test_a_login_code_goes_by_sms_to_the_registered_phone_and_nowhere_else(switch, tmp_path):
    from .messaging import CARDS, PHONES, messaging_switch, until

    async with messaging_switch(switch, tmp_path) as ms:
        card, phone = CARDS[0], PHONES[0]
        await ms.subscribe(card, "sms", phone)
        assert ms.running.web is not None and ms.running.web.bound is not None
        host, port = ms.running.web.bound
        base = f"http://{host}:{port}"
        assert (await request(base, "POST", "/api/v1/member/login", b'{"card": "%s"}' % card.encode())).status == 202
        sms = await until(lambda: ms.inbox.to(phone), what="the login code by SMS")
        code = sms[0]["params"]["code"]
        assert len(code) == 6 and code in sms[0]["text"] and sms[0]["template"] == "login_code"
        token = await request(base, "POST", "/api/v1/member/token", b'{"card": "%s", "code": "%s"}'
                              % (card.encode(), code.encode()))
        assert token.status == 200
        # A card with no phone registered gets the same answer and no message.
        assert (await request(base, "POST", "/api/v1/member/login",
                              b'{"card": "%s"}' % CARDS[1].encode())).status == 202
        assert len(ms.inbox.received) == 1
        # Sent directly, never queued: no code in the outbox or anywhere else in the database.
        assert await ms.outbox() == []
        assert (await ms.fetch("SELECT count(*) AS n FROM member_code_deliveries"))[0]["n"] == 0
