"""What the API answers: an outcome of the ledger as JSON (the ISO response code in
``code``), refusals before the ledger, and running a command under a deadline with
the same rule as the ISO listeners: an answer never lies.

HTTP 200 carries every answer the ledger decided (approved or declined: ``code``
says which); 4xx and 5xx are requests refused before the ledger saw them. A 503
with code 96 means nothing was posted; a 504 with code 09 means the outcome is not
known (an earlier attempt may have committed): retry with the same Idempotency-Key.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web

from ...ledger import Command, Ledger, Outcome, Posting, gate
from ...routing import codes
from ...switch.health import DATABASE_ERRORS

log = structlog.get_logger("pointswitch.web.api")

# The response's code and the request's operation, for the metrics middleware (web.api.setup).
CODE: web.ResponseKey[str] = web.ResponseKey("code")
OPERATION: web.RequestKey[str] = web.RequestKey("operation")
MASKED_CARD: web.RequestKey[str] = web.RequestKey("masked_card")  # for the request's log line


def refusal(status: int, code: str, message: str, **extra: Any) -> web.Response:
    response = web.json_response({"code": code, "message": message, **extra}, status=status)
    response[CODE] = code
    return response


def bad_request(message: str) -> web.Response:
    return refusal(400, codes.FORMAT_ERROR, message)


def unauthorized(message: str) -> web.Response:
    return refusal(401, codes.MAC_ERROR, message)


def outcome_body(outcome: Outcome, operation: str) -> dict[str, Any]:
    """The JSON of a ledger outcome: the same facts an ISO response carries."""
    body: dict[str, Any] = {
        "code": codes.FOR_STATUS[outcome.status],
        "message": outcome.status.value.replace("_", " "),
        "operation": operation,
        "host_time": outcome.host_time,
    }
    if outcome.rrn:
        body["rrn"] = outcome.rrn
    if outcome.business_date:
        body["business_date"] = outcome.business_date
    if outcome.approved:
        if outcome.auth_code:
            body["auth_code"] = outcome.auth_code
        body["points"] = outcome.points_moved
        if outcome.points_balance is not None:
            body["points_balance"] = outcome.points_balance
        if outcome.cash_value_fen is not None:
            body["cash_value_fen"] = outcome.cash_value_fen
        next_expiry = outcome.extra.get("next_expiry")
        if next_expiry:
            body["next_expiry"] = {"date": next_expiry["date"], "points": next_expiry["points"]}
    return body


def answer(outcome: Outcome, operation: str) -> web.Response:
    body = outcome_body(outcome, operation)
    response = web.json_response(body)
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response[CODE] = body["code"]
    return response


def not_committed() -> web.Response:
    return refusal(503, codes.SYSTEM_MALFUNCTION, "not done: nothing was posted")


def unknown_outcome() -> web.Response:
    return refusal(504, codes.REQUEST_IN_PROGRESS,
                   "outcome unknown: retry with the same Idempotency-Key to learn it")


def _retrieve(work: asyncio.Future[Outcome]) -> None:
    if not work.cancelled():
        work.exception()


async def execute(ledger: Ledger, command: Command, operation: str, *, timeout_s: float,
                  commit_wait_s: float) -> web.Response:
    """Run ``command`` under a write gate and a deadline (as ``switch.handler`` does for
    ISO requests) and answer what happened, truthfully."""
    write_gate = gate.WriteGate()
    with gate.gated(write_gate):
        work = asyncio.ensure_future(ledger.execute(command))
    work.add_done_callback(_retrieve)
    # 96 is true only when no earlier attempt of this request can have committed.
    nothing_before = not isinstance(command, Posting)
    done, _ = await asyncio.wait({work}, timeout=timeout_s)
    if not done:
        if write_gate.abandon():
            work.cancel()
            log.warning("API request timed out before it could commit", operation=operation)
            return not_committed() if nothing_before or write_gate.key_checked else unknown_outcome()
        done, _ = await asyncio.wait({work}, timeout=commit_wait_s)
        if not done:
            write_gate.sever()
            work.cancel()
            log.error("API request: commit outcome unknown", operation=operation)
            return unknown_outcome()
    try:
        outcome = work.result()
    except Exception as exc:
        if write_gate.settled:
            return unknown_outcome()
        if isinstance(exc, DATABASE_ERRORS):
            log.warning("API request failed: database unavailable", operation=operation, error=type(exc).__name__)
        else:
            log.exception("API request failed", operation=operation)
        return not_committed() if nothing_before or write_gate.key_checked else unknown_outcome()
    return answer(outcome, operation)
