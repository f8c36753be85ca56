"""The member side of the API: log in with a one-time code, then read one's own
card (balance, points by expiry, history) with a bearer token.

``POST /member/login {card}`` always answers 202 the same way, whether the card
exists, a code was sent recently or the card's logins are locked: the answer tells
a stranger nothing about the card. ``POST /member/token {card, code}`` answers a
token, or 401 (wrong or expired code: 55; logins locked after too many: 75).
Both are limited per client address.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ...ledger.members import CodeCheck, CodeIssue
from ...routing import codes
from .answers import CODE, OPERATION, bad_request, refusal, unauthorized
from .merchant import CARD
from .state import STATE, ApiState


def _ok(body: dict[str, Any], status: int = 200) -> web.Response:
    response = web.json_response({"code": codes.APPROVED, **body}, status=status)
    response[CODE] = codes.APPROVED
    return response


async def _body(request: web.Request, fields: set[str]) -> dict[str, Any] | web.Response:
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        return bad_request("the body is not JSON")
    if not isinstance(body, dict) or set(body) != fields or not all(isinstance(v, str) for v in body.values()):
        return bad_request(f"the body is an object with {', '.join(sorted(fields))} (strings)")
    if not CARD.fullmatch(body["card"]):
        return bad_request("card: 12 to 19 digits")
    return body


def _limited(request: web.Request, state: ApiState) -> web.Response | None:
    if not state.logins.allow(request.remote or ""):
        return refusal(429, codes.EXCEEDS_FREQUENCY, "too many login requests from this address")
    return None


async def login(request: web.Request) -> web.Response:
    state = request.app[STATE]
    request[OPERATION] = "member_login"
    body = await _body(request, {"card"})
    if isinstance(body, web.Response):
        return body
    if (limited := _limited(request, state)) is not None:
        return limited
    card_index = state.members.card_index(body["card"])
    issued, code = await state.members.issue_code(card_index)
    if issued is CodeIssue.ISSUED:
        await state.codes.send(card_index, code)
    return _ok({"message": "if the card is registered, a code is on its way to the holder's phone",
                "expires_in_s": int(state.config.member_code_ttl_s)}, status=202)


async def token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    request[OPERATION] = "member_token"
    body = await _body(request, {"card", "code"})
    if isinstance(body, web.Response):
        return body
    if (limited := _limited(request, state)) is not None:
        return limited
    card_index = state.members.card_index(body["card"])
    checked = await state.members.check_code(card_index, body["code"])
    if checked is CodeCheck.LOCKED:
        return refusal(401, codes.PIN_TRIES_EXCEEDED, "too many wrong codes: logins are locked for a while")
    if checked is not CodeCheck.ACCEPTED:
        return refusal(401, codes.WRONG_PIN, "wrong or expired code")
    issued, expires = state.tokens.issue(card_index)
    return _ok({"message": "logged in", "token": issued, "token_type": "Bearer", "expires_at": expires})


def _card(request: web.Request, state: ApiState) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value:
        return None
    return state.tokens.card_index(value.strip())


async def balance(request: web.Request) -> web.Response:
    state = request.app[STATE]
    request[OPERATION] = "member_balance"
    card_index = _card(request, state)
    if card_index is None:
        return unauthorized("a valid bearer token is required")
    found = await state.members.balance(card_index)
    if found is None:
        return refusal(404, codes.INVALID_CARD, "no such card")
    return _ok(found)


async def expiry(request: web.Request) -> web.Response:
    state = request.app[STATE]
    request[OPERATION] = "member_expiry"
    card_index = _card(request, state)
    if card_index is None:
        return unauthorized("a valid bearer token is required")
    return _ok(await state.members.expiries(card_index))


async def history(request: web.Request) -> web.Response:
    state = request.app[STATE]
    request[OPERATION] = "member_history"
    card_index = _card(request, state)
    if card_index is None:
        return unauthorized("a valid bearer token is required")
    limit_text = request.query.get("limit", "20")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= state.config.max_history:
        return bad_request(f"limit: 1 to {state.config.max_history}")
    return _ok({"postings": await state.members.history(card_index, int(limit_text))})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/member/login", login)
    app.router.add_post("/member/token", token)
    app.router.add_get("/member/balance", balance)
    app.router.add_get("/member/expiry", expiry)
    app.router.add_get("/member/history", history)
