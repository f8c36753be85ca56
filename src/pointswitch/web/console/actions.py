"""The console's changes (POST): each needs a role, calls one ledger function (which
writes its audit entry, naming the operator, in the transaction of the change),
and sends the browser back to the screen it came from. A refusal (no such card,
a day that cannot close yet) is shown on a page of its own with status 409."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any

from aiohttp import web

from ...ledger import admin, days, operators, views
from ...ledger.errors import AdminError
from ...ledger.saf import ReversalError, ReversalQueue
from .site import render, requires, see_other, services, signed_in

_REFUSALS = (AdminError, ReversalError, days.DayError)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _form(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}


async def _change(request: web.Request, step: Callable[[], Awaitable[Any]], back_to: str | Callable[[], str],
                  done: str) -> web.Response:
    """Run ``step``, then send the browser to ``back_to`` (a path, or what gives it once
    the step is done) saying ``done``; a refusal is a page saying why (status 409)."""
    try:
        await step()
    except _REFUSALS as exc:
        return render(request, "refused.html", status=409, reason=str(exc))
    raise see_other(back_to if isinstance(back_to, str) else back_to(), done)


# -- cards ---------------------------------------------------------------------------
_CARD_NUMBER = re.compile(r"[0-9]{12,19}")


async def card_find(request: web.Request) -> web.StreamResponse:
    """The card number comes in the form (never in a URL) and leaves as its card index."""
    number = (await _form(request)).get("card_number", "").replace(" ", "")
    if not _CARD_NUMBER.fullmatch(number):
        return render(request, "card_search.html", status=400, error="A card number is 12 to 19 digits.")
    svc = services(request)
    index = svc.ledger.vault.card_index(number)
    async with svc.pool.acquire() as con:
        found = await views.find_card(con, index)
    if not found:
        return render(request, "card_search.html", status=404, error="No card with that number.")
    raise web.HTTPSeeOther(f"/console/cards/{index}")


def _card_change(done: str, change: Callable[[Any, Any, str], Awaitable[Any]]) -> Handler:
    @requires("operator")
    async def handler(request: web.Request) -> web.StreamResponse:
        svc, index = services(request), request.match_info["index"]

        async def step() -> None:
            async with svc.pool.acquire() as con:
                await change(con, svc.ledger.vault, index)

        return await _change(request, step, f"/cards/{index}", done)
    return handler


card_block = _card_change("blocked", lambda con, vault, index: admin.set_card_status_at(con, vault, index, "blocked"))
card_unblock = _card_change("unblocked", lambda con, vault, index: admin.set_card_status_at(con, vault, index,
                                                                                             "active"))
card_unlock_pin = _card_change("pin_unlocked", lambda con, vault, index: admin.unlock_pin_at(con, vault, index))


@requires("operator")
async def card_reveal(request: web.Request) -> web.Response:
    """The card number, holder and phone in clear, once, on this page; the reveal is audited."""
    svc = services(request)
    async with svc.pool.acquire() as con:
        try:
            shown = await admin.card_view(con, svc.ledger.vault, request.match_info["index"], 0, reveal=True)
        except AdminError:
            raise web.HTTPNotFound(text="no such card") from None
    return render(request, "card.html", card=shown, index=request.match_info["index"], revealed=True)


# -- terminals and merchants -------------------------------------------------------
def _terminal_status(status: str, done: str) -> Handler:
    @requires("operator")
    async def handler(request: web.Request) -> web.StreamResponse:
        terminal_id = request.match_info["terminal_id"]

        async def step() -> None:
            async with services(request).pool.acquire() as con:
                await admin.set_terminal_status(con, terminal_id, status)

        return await _change(request, step, f"/terminals/{terminal_id}", done)
    return handler


terminal_disable = _terminal_status("disabled", "disabled")
terminal_enable = _terminal_status("active", "enabled")


@requires("operator")
async def merchant_rates(request: web.Request) -> web.StreamResponse:
    merchant_id, form = request.match_info["merchant_id"], await _form(request)

    async def step() -> None:
        async with services(request).pool.acquire() as con:
            await admin.update_merchant(con, merchant_id, earn_rate=form.get("earn_rate") or None,
                                        issue_price=form.get("issue_price") or None,
                                        redeem_value=form.get("redeem_value") or None)

    return await _change(request, step, f"/merchants/{merchant_id}", "rates")


# -- reversals and days ---------------------------------------------------------------
def _reversal_id(request: web.Request) -> int:
    try:
        return int(request.match_info["reversal_id"])
    except ValueError:
        raise web.HTTPNotFound(text="not a reversal id") from None


@requires("operator")
async def reversal_retry(request: web.Request) -> web.StreamResponse:
    queue, rid = ReversalQueue(services(request).ledger), _reversal_id(request)
    return await _change(request, lambda: queue.retry_now(rid), "/reversals", "retried")


@requires("operator")
async def reversal_resolve(request: web.Request) -> web.StreamResponse:
    queue, rid = ReversalQueue(services(request).ledger), _reversal_id(request)
    outcome = (await _form(request)).get("outcome", "")
    return await _change(request, lambda: queue.resolve(rid, outcome), "/reversals", "resolved")


@requires("operator")
async def day_close(request: web.Request) -> web.StreamResponse:
    """Close the open business day (cut off now) or, with a date, that day. It runs
    to the end even if the browser goes away: a close is not to be cut in half."""
    svc, text = services(request), (await _form(request)).get("date", "")
    cfg = svc.config
    try:
        day = date.fromisoformat(text) if text else None
    except ValueError:
        return render(request, "refused.html", status=409, reason=f"{text!r} is not a date YYYY-MM-DD")
    closed: list[days.Closed] = []

    async def step() -> None:
        closed.append(await asyncio.shield(days.close_day(
            svc.pool, svc.ledger, day, by=signed_in(request).name, clearing_dir=cfg.clearing_dir,
            lock_timeout_ms=cfg.day.cutoff_lock_timeout_ms, max_attempts=cfg.day.cutoff_attempts)))

    return await _change(request, step, lambda: f"/days/{closed[0].report['business_date']}", "closed")


# -- operators (admin) -------------------------------------------------------------------
@requires("admin")
async def operator_list(request: web.Request) -> web.Response:
    async with services(request).pool.acquire() as con:
        rows = await operators.list_operators(con)
    return render(request, "operators.html", operators=rows, roles=operators.ROLES)


@requires("admin")
async def operator_add(request: web.Request) -> web.StreamResponse:
    form, settings = await _form(request), services(request).config.console

    async def step() -> None:
        operators.check_password_rules(form.get("password", ""), settings.min_password_length)
        hashed = await asyncio.to_thread(operators.hash_password, form.get("password", ""))
        async with services(request).pool.acquire() as con:
            await operators.add_operator(con, form.get("name", ""), form.get("role", ""), hashed)

    return await _change(request, step, "/operators", "operator")


@requires("admin")
async def operator_change(request: web.Request) -> web.StreamResponse:
    """A new role, or disable / enable: ends the operator's sessions."""
    name, form = request.match_info["name"], await _form(request)

    async def step() -> None:
        if name == signed_in(request).name:  # so the console never loses its last admin
            raise AdminError("change your own account with `pointswitch admin operator`, not here")
        async with services(request).pool.acquire() as con:
            if form.get("role"):
                await operators.set_role(con, name, form["role"])
            elif form.get("disabled") in ("true", "false"):
                await operators.set_disabled(con, name, form["disabled"] == "true")
            else:
                raise AdminError("give a role, or disabled true or false")

    return await _change(request, step, "/operators", "operator")
