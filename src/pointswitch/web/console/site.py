"""What every console request goes through: the session, the form token, the role,
the audit context, the page template.

The console is an aiohttp sub-application mounted at ``/console``. Its
middleware, for every path but the login page and the
static files: finds the operator the session cookie names (re-read from the
database, so a disabled account or a new role counts at once; a GET without one
is sent to the login page, anything else gets 401); refuses a POST whose form
token does not match the session (403); and runs the handler with the audit
trail naming the operator and the browser's address. Each handler declares the
role it needs with :func:`requires`; a POST below it gets 403.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import jinja2
from aiohttp import web

from ...ledger import audit, operators
from ...ledger.operators import Operator
from ..server import SERVICES, WebServices
from .security import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, Keys, Session

PREFIX = "/console"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Pages forbid what they never need: scripts, styles and images from elsewhere,
# inline scripts, being framed, forms posting to another site.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none';"
        " frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


@dataclass
class Console:
    services: WebServices
    keys: Keys
    templates: jinja2.Environment
    logins: asyncio.Semaphore  # password checks at once (each 32 MiB of scrypt)

    @property
    def settings(self) -> Any:
        return self.services.config.console


CONSOLE: web.AppKey[Console] = web.AppKey("console")
# The operator signed in and their session, for the request being handled (set by ``guard``).
_OPERATOR: ContextVar[Operator | None] = ContextVar("console_operator", default=None)
_SESSION: ContextVar[Session | None] = ContextVar("console_session", default=None)


def console(request: web.Request) -> Console:
    return request.app[CONSOLE]


def services(request: web.Request) -> WebServices:
    return request.config_dict[SERVICES]


def signed_in(request: web.Request) -> Operator:
    op = _OPERATOR.get()
    assert op is not None, "only for handlers behind guard"
    return op


def requires(role: str) -> Callable[[Handler], Handler]:
    """The handler needs ``role`` (or a higher one); below it the answer is 403."""
    def wrap(handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if not signed_in(request).may(role):
                raise web.HTTPForbidden(text=f"this needs the {role} role")
            return await handler(request)
        checked.__name__ = handler.__name__
        return checked
    return wrap


def _public(path: str) -> bool:
    return path in (f"{PREFIX}/login",) or path.startswith(f"{PREFIX}/static/")


async def form_token_ok(request: web.Request, nonce: str | None) -> bool:
    """Whether the POST carries the form token of ``nonce`` (a form field, or htmx's header)."""
    token = request.headers.get(CSRF_HEADER)
    if token is None:
        form = await request.post()
        value = form.get(CSRF_FIELD)
        token = value if isinstance(value, str) else None
    return console(request).keys.token_valid(nonce, token)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _public(request.path):
        return _headers(await handler(request))
    con_ = console(request)
    session: Session | None = con_.keys.session(request.cookies.get(SESSION_COOKIE), time.time())
    op = None
    if session is not None:
        async with services(request).pool.acquire() as con:
            op = await operators.signed_in(con, session.operator_id, session.generation)
    reading = request.method in ("GET", "HEAD")
    if op is None or session is None:
        if request.headers.get("HX-Request"):  # htmx's refresh: the whole page goes to the login form
            raise web.HTTPUnauthorized(text="sign in first", headers={"HX-Redirect": f"{PREFIX}/login"})
        if reading:
            raise web.HTTPSeeOther(f"{PREFIX}/login")
        raise web.HTTPUnauthorized(text="sign in first")
    if not reading and not await form_token_ok(request, session.nonce):
        raise web.HTTPForbidden(text="the form's token is missing or does not match the session: reload the page")
    tokens = _OPERATOR.set(op), _SESSION.set(session)
    try:
        with audit.acting_as(op.name, where(request)):
            return _headers(await handler(request))
    finally:
        _OPERATOR.reset(tokens[0])
        _SESSION.reset(tokens[1])


def where(request: web.Request) -> str:
    """The audit trail's origin of a console request: the browser's address."""
    return f"console {request.remote or '-'}"


def _headers(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if response.content_type in ("text/html", "text/csv"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


# What a redirect after a change says, by a fixed word in its query (never text from the query itself).
DONE = {
    "blocked": "Card blocked.", "unblocked": "Card unblocked.", "pin_unlocked": "PIN unlocked.",
    "disabled": "Terminal disabled.", "enabled": "Terminal enabled.", "rates": "Rates saved.",
    "retried": "Reversal due now.", "resolved": "Reversal resolved.", "closed": "Business day closed.",
    "operator": "Operator saved.",
}


def render(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    """A page: the template with the operator, their form token and the message of ``?done=``."""
    session = _SESSION.get()
    keys = console(request).keys
    html = console(request).templates.get_template(template).render(
        operator=_OPERATOR.get(), csrf_field=CSRF_FIELD,
        csrf_token=keys.form_token(session.nonce) if session else context.pop("login_token", ""),
        done=DONE.get(request.query.get("done", "")), prefix=PREFIX, **context)
    return web.Response(text=html, content_type="text/html", status=status)


def see_other(path: str, done: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"{PREFIX}{path}?done={done}")
