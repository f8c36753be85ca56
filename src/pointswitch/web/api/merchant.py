"""The merchant side of the API: accrue, redeem, void, refund and inquire, for a
merchant's online shop or PC, with the same rules and response codes as the ISO
operations. Each request reads as its steps: authenticate the terminal (signature,
window, replay, rate), admit it (known, active, of its merchant, an API terminal),
check the body, map the Idempotency-Key onto the ledger's request key, execute.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ...ledger import Inquire, Operation, OriginalRef, Posting, RequestKey
from ...ledger.api import API_DIALECT, TracesExhausted
from ...logs import mask_pan
from ...routing import codes
from . import guard
from .answers import MASKED_CARD, OPERATION, bad_request, execute, refusal, unauthorized
from .state import STATE, ApiState

_TERMINAL = re.compile(r"[\x21-\x7e]{1,8}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,64}")
CARD = re.compile(r"[0-9]{12,19}")
_PIN = re.compile(r"[0-9]{4,12}")
MAX_AMOUNT_FEN = 10**12 - 1  # what an ISO amount (field 4, n12) can carry

# Body fields per operation: exactly these (so the fingerprint covers the whole request, PIN aside).
_FIELDS: dict[str, set[str]] = {
    "accrue": {"card", "amount_fen"},
    "redeem": {"card", "amount_fen", "pin"},
    "void": {"card", "amount_fen", "original"},
    "refund": {"card", "amount_fen", "original"},
    "inquire": {"card", "pin"},
}


@dataclass(frozen=True)
class Caller:
    terminal_id: str
    merchant_id: str
    idempotency_key: str
    body: dict[str, Any]


class Refused(Exception):
    def __init__(self, response: web.Response):
        self.response = response


async def _authenticate(request: web.Request, state: ApiState, operation: str, *, write: bool) -> Caller:
    h = request.headers
    terminal_id, timestamp, signature = h.get("X-Terminal", ""), h.get("X-Timestamp", ""), h.get("X-Signature", "")
    idempotency_key = h.get("Idempotency-Key", "")
    if not (_TERMINAL.fullmatch(terminal_id) and timestamp and signature):
        raise Refused(unauthorized("X-Terminal, X-Timestamp and X-Signature are required"))
    if not guard.timestamp_fresh(timestamp, state.config.signature_window_s):
        raise Refused(unauthorized("X-Timestamp outside the allowed window"))
    raw = await request.read()
    key = await state.keys.get(terminal_id)
    if key is None or not guard.signature_matches(key, signature, request.method, request.raw_path, timestamp,
                                                  idempotency_key, raw):
        raise Refused(unauthorized("signature does not verify"))
    if not state.rates.allow(terminal_id):
        raise Refused(refusal(429, codes.EXCEEDS_FREQUENCY, "too many requests for this API key"))
    if write:
        if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise Refused(bad_request("an Idempotency-Key header (1-64 printable characters) is required"))
    else:  # no key makes a replay harmless here: each signature is good once
        first = state.replays.first_use(signature)
        if first is None:
            raise Refused(refusal(503, codes.SYSTEM_MALFUNCTION, "too busy: try again"))
        if not first:
            raise Refused(unauthorized("signature already used"))
    auth = await state.ledger.terminal_auth(terminal_id)
    if auth is None:
        raise Refused(refusal(403, codes.TERMINAL_NOT_REGISTERED, "unknown terminal"))
    if not auth.merchant_active:
        raise Refused(refusal(403, codes.INVALID_MERCHANT, "merchant not active"))
    if not auth.terminal_active or auth.profile.dialect != API_DIALECT:
        raise Refused(refusal(403, codes.NOT_ALLOWED_AT_TERMINAL, "terminal not enabled for the API"))
    body = _body(raw, operation)
    request[MASKED_CARD] = mask_pan(body["card"])
    return Caller(terminal_id, auth.merchant_id, idempotency_key, body)


def _body(raw: bytes, operation: str) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        raise Refused(bad_request("the body is not JSON")) from None
    fields = _FIELDS[operation]
    if not isinstance(body, dict) or set(body) != fields:
        raise Refused(bad_request(f"the body is an object with {', '.join(sorted(fields))} and nothing else"))
    if not (isinstance(body["card"], str) and CARD.fullmatch(body["card"])):
        raise Refused(bad_request("card: 12 to 19 digits"))
    amount = body.get("amount_fen", 1)
    if type(amount) is not int or not 0 < amount <= MAX_AMOUNT_FEN:
        raise Refused(bad_request(f"amount_fen: an integer from 1 to {MAX_AMOUNT_FEN}"))
    if "pin" in body and not (isinstance(body["pin"], str) and _PIN.fullmatch(body["pin"])):
        raise Refused(bad_request("pin: 4 to 12 digits"))
    if "original" in body and not (isinstance(body["original"], str) and IDEMPOTENCY_KEY.fullmatch(body["original"])):
        raise Refused(bad_request("original: the Idempotency-Key of the original request"))
    return body


async def _posting(request: web.Request, operation: str) -> web.Response:
    """``operation``: the endpoint; its ledger operation (void: of an accrual or of a
    redemption, by the original) names it in the answer and the metrics, as on ISO."""
    state = request.app[STATE]
    request[OPERATION] = operation
    try:
        caller = await _authenticate(request, state, operation, write=True)
        body = caller.body
        original, kind = None, {"accrue": Operation.ACCRUE, "redeem": Operation.REDEEM,
                                "refund": Operation.REFUND, "void": Operation.VOID_ACCRUAL}[operation]
        if "original" in body:
            found = await state.terminals.original(caller.terminal_id, body["original"])
            # An original never posted points at trace 0, which no request has: the
            # ledger declines it (25) under this request's own key, as it would an ISO one.
            ref_key = found.key if found is not None else RequestKey(caller.terminal_id, 0, 0)
            original = OriginalRef(ref_key.batch, ref_key.trace)
            if operation == "void" and found is not None and found.operation is Operation.REDEEM:
                kind = Operation.VOID_REDEMPTION
        request[OPERATION] = kind.value
        key = await state.terminals.request_key(caller.terminal_id, caller.idempotency_key)
    except Refused as refused:
        return refused.response
    except TracesExhausted:
        return refusal(503, codes.SYSTEM_MALFUNCTION, "this terminal's batch is full: nothing was posted")
    pin = body.get("pin")
    command = Posting(caller.terminal_id, caller.merchant_id, key, body["card"], body["amount_fen"], kind,
                      original, pin_required=pin is not None, pin=pin)
    return await execute(state.ledger, command, kind.value, timeout_s=state.request_timeout_s,
                         commit_wait_s=state.commit_wait_s)


async def accrue(request: web.Request) -> web.Response:
    return await _posting(request, "accrue")


async def redeem(request: web.Request) -> web.Response:
    return await _posting(request, "redeem")


async def void(request: web.Request) -> web.Response:
    return await _posting(request, "void")


async def refund(request: web.Request) -> web.Response:
    return await _posting(request, "refund")


async def inquire(request: web.Request) -> web.Response:
    state = request.app[STATE]
    request[OPERATION] = "inquiry"
    try:
        caller = await _authenticate(request, state, "inquire", write=False)
    except Refused as refused:
        return refused.response
    body = caller.body
    command = Inquire(caller.terminal_id, caller.merchant_id, body["card"], pin_required=True, pin=body["pin"])
    return await execute(state.ledger, command, "inquiry", timeout_s=state.request_timeout_s,
                         commit_wait_s=state.commit_wait_s)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/accrue", accrue)
    app.router.add_post("/redeem", redeem)
    app.router.add_post("/void", void)
    app.router.add_post("/refund", refund)
    app.router.add_post("/inquire", inquire)
