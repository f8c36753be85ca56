"""What the JSON API leaves in the log: no card number, PIN, API key, signature,
login code or token in clear, at debug level, through every endpoint."""

from __future__ import annotations

import io
import os

from pointswitch import logs

from .api_support import api_client, base_url, request
from .conftest import TEST_PIN
from .test_api_member import _code


async def test_no_secret_reaches_the_log(switch, network):
    captured = io.StringIO()
    logs.configure("debug", json=True, stream=captured)
    try:
        api = await api_client(switch, network)
        card, stranger = network.cards[0], "6211110000000001"
        seen = [await api.post("/accrue", {"card": card, "amount_fen": 1000}),
                await api.post("/redeem", {"card": card, "amount_fen": 1, "pin": TEST_PIN}),
                await api.post("/redeem", {"card": card, "amount_fen": 1, "pin": "654321"}),
                await api.post("/inquire", {"card": card, "pin": TEST_PIN}),
                await api.post("/accrue", {"card": stranger, "amount_fen": 1000}),
                await api.post("/accrue", {"card": card, "amount_fen": 1000}, sign_with=b"wrong")]
        assert [a.code for a in seen] == ["00", "00", "55", "00", "14", "A0"]
        base = base_url(switch)
        await request(base, "POST", "/api/v1/member/login", b'{"card": "%s"}' % card.encode())
        code = str(await _code(switch, card))
        token = await request(base, "POST", "/api/v1/member/token", b'{"card": "%s", "code": "%s"}'
                              % (card.encode(), code.encode()))
        await request(base, "GET", "/api/v1/member/history",
                      headers={"Authorization": f"Bearer {token.body['token']}"})
    finally:
        logs.configure(os.environ.get("POINTSWITCH_TEST_LOG_LEVEL", "warning"))
    text = captured.getvalue()
    lines = [line for line in text.splitlines() if '"api transaction' in line]
    assert len(lines) >= 9, "every API request has its log line"
    assert any(f'"card": "{card[:6]}' in line and card[-4:] in line for line in lines), "cards appear masked"
    for secret in (card, stranger, TEST_PIN, "654321", api.key.hex(), code, token.body["token"]):
        assert secret not in text
