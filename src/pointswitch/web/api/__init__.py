"""The JSON API under ``/api/v1`` (docs/api.md): merchants' shops and PCs (accrue,
redeem, void, refund, inquire; signed with the terminal's API key) and members'
apps (balance, points by expiry, history; a bearer token after a one-time code).

It reaches the ledger only through the ledger's own functions (``ledger.api``,
``ledger.members`` and the commands ``Ledger.execute`` runs, as routing does).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from ...ledger.api import ApiTerminals
from ...ledger.members import CodeRules, MemberCards
from ...messages.channels import SmsGateway
from ...routing import codes
from ...switch import metrics
from ...switch.health import DATABASE_ERRORS
from . import member, merchant
from .answers import CODE, MASKED_CARD, OPERATION, refusal
from .guard import KeyCache, ReplayGuard, TokenBuckets
from .login_codes import CodeSender, SmsCodes, StoredCodes
from .openapi import openapi_document
from .state import STATE, ApiState
from .tokens import TokenSigner

log = structlog.get_logger("pointswitch.web.api")

PREFIX = "/api/v1"
_REQUESTS = metrics.RequestMetrics("api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _limit_and_count(request: web.Request, handler: Handler) -> web.StreamResponse:
    """At most ``max_requests_in_flight`` at once (past it: 503, code 96, nothing done);
    every answer counted by operation and code, and timed."""
    state = request.app[STATE]
    started = time.perf_counter()
    if state.in_flight >= state.config.max_requests_in_flight:
        response: web.StreamResponse = refusal(503, codes.SYSTEM_MALFUNCTION, "too many requests in progress")
    else:
        state.in_flight += 1
        metrics.API_REQUESTS_IN_FLIGHT.inc()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # 404, 405, 413 ...: counted, then answered as aiohttp does
            _REQUESTS.observe(request.get(OPERATION, "other"), str(exc.status), time.perf_counter() - started)
            raise
        except Exception as exc:  # before the ledger's own deadline handling: nothing was posted
            if not isinstance(exc, DATABASE_ERRORS):
                log.exception("API request failed", operation=request.get(OPERATION, "other"))
            response = refusal(503, codes.SYSTEM_MALFUNCTION, "not done: nothing was posted")
        finally:
            state.in_flight -= 1
            metrics.API_REQUESTS_IN_FLIGHT.dec()
    seconds = time.perf_counter() - started
    operation, code = request.get(OPERATION, "other"), response.get(CODE) or str(response.status)
    _REQUESTS.observe(operation, code, seconds)
    log.info("api transaction" if code == codes.APPROVED else "api transaction declined", operation=operation,
             terminal=request.headers.get("X-Terminal", "")[:8] or None, card=request.get(MASKED_CARD),
             idempotency_key=request.headers.get("Idempotency-Key", "")[:64] or None, rc=code,
             http_status=response.status, peer=request.remote, latency_ms=round(seconds * 1000, 2))
    return response


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def setup_api(app: web.Application, services: Any) -> web.Application:
    """Mount the API on ``app`` at /api/v1 (the state is completed at start-up)."""
    config, pool, ledger = services.config, services.pool, services.ledger
    api = config.api
    vault = ledger.vault
    timeout_s = config.database.command_timeout_s
    terminals = ApiTerminals(pool, vault, acquire_timeout_s=timeout_s)
    members = MemberCards(pool, vault, CodeRules(api.member_code_ttl_s, api.member_code_resend_s,
                                                  api.member_code_tries, api.member_max_failures,
                                                  api.member_lockout_s), acquire_timeout_s=timeout_s)
    sub = web.Application(middlewares=[_limit_and_count], client_max_size=config.http.max_body_bytes)

    async def start(_app: web.Application) -> None:
        signer = TokenSigner(await members.secret("member-token"), api.member_token_ttl_s)
        codes_sender: CodeSender = services.extra.get("code_sender") or StoredCodes(members)
        if "code_sender" not in services.extra and config.messages.enabled and config.messages.sms_url:
            session = sessions[0] = aiohttp.ClientSession()
            codes_sender = SmsCodes(members, SmsGateway(session, config.messages), api.member_code_ttl_s)
        sub[STATE] = ApiState(
            config=api, ledger=ledger, terminals=terminals, members=members,
            keys=KeyCache(terminals.key, api.key_cache_s, api.max_tracked_clients),
            rates=TokenBuckets(api.requests_per_s_per_key, api.burst_per_key, api.max_tracked_clients),
            replays=ReplayGuard(api.signature_window_s, api.max_replay_entries),
            logins=TokenBuckets(api.member_logins_per_minute_per_client / 60,
                                api.member_logins_per_minute_per_client, api.max_tracked_clients),
            tokens=signer, codes=codes_sender,
            request_timeout_s=config.limits.request_timeout_s, commit_wait_s=config.limits.commit_wait_s)

    async def stop(_app: web.Application) -> None:
        for session in sessions.values():
            await session.close()

    sessions: dict[int, aiohttp.ClientSession] = {}  # the SMS gateway's, when login codes go by SMS
    sub.on_startup.append(start)
    sub.on_cleanup.append(stop)
    sub.router.add_get("/openapi.json", _openapi)
    merchant.add_routes(sub)
    member.add_routes(sub)
    app.add_subapp(PREFIX, sub)
    return sub
