"""Sign-in and sign-out: the login form (with its own form token), the password
check off the event loop, the session cookie."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from ...ledger import audit, operators
from .security import LOGIN_COOKIE, LOGIN_COOKIE_TTL_S, SESSION_COOKIE, new_nonce
from .site import PREFIX, console, form_token_ok, render, services, signed_in, where

_MAX_NAME_CHARS = 64


def _cookie(response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="Strict",
                        secure=console(request).settings.secure_cookies)


def _login_page(request: web.Request, *, error: str | None = None, status: int = 200) -> web.Response:
    nonce = request.cookies.get(LOGIN_COOKIE)
    fresh = not nonce or len(nonce) > 64
    if fresh:
        nonce = new_nonce()
    assert nonce is not None
    response = render(request, "login.html", status=status, error=error,
                      login_token=console(request).keys.form_token(nonce))
    if fresh:
        _cookie(response, request, LOGIN_COOKIE, nonce, LOGIN_COOKIE_TTL_S)
    return response


async def login_form(request: web.Request) -> web.Response:
    return _login_page(request)


async def login(request: web.Request) -> web.StreamResponse:
    if not await form_token_ok(request, request.cookies.get(LOGIN_COOKIE)):
        raise web.HTTPForbidden(text="the login form's token is missing or stale: reload the login page")
    form = await request.post()
    name, password = str(form.get("name", ""))[:_MAX_NAME_CHARS].strip(), str(form.get("password", ""))
    site = console(request)
    async with services(request).pool.acquire() as con:
        stored = await operators.stored_hash(con, name)
    async with site.logins:  # scrypt takes 32 MiB and a tenth of a second of a core: a few at a time
        ok = await asyncio.to_thread(operators.password_matches, password, stored)
    with audit.acting_as("anonymous", where(request)):  # who tried is not known until it succeeds
        async with services(request).pool.acquire() as con:
            op = await operators.record_login(con, name, ok, max_failed=site.settings.max_failed_logins,
                                              lockout_s=site.settings.lockout_s)
    if op is None:
        # One answer for a wrong password, an unknown name, a locked or disabled account.
        return _login_page(request, status=401, error="Wrong name or password, or the account is locked.")
    cookie = site.keys.issue(op.operator_id, op.session_generation, time.time() + site.settings.session_ttl_s)
    response = web.HTTPSeeOther(f"{PREFIX}/")
    _cookie(response, request, SESSION_COOKIE, cookie, int(site.settings.session_ttl_s))
    response.del_cookie(LOGIN_COOKIE, path=PREFIX)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    """Ends every session of this operator (the generation moves on), not just this browser's."""
    async with services(request).pool.acquire() as con:
        await operators.end_sessions(con, signed_in(request).operator_id)
    response = web.HTTPSeeOther(f"{PREFIX}/login")
    response.del_cookie(SESSION_COOKIE, path=PREFIX)
    raise response
