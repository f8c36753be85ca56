"""The operator console (query management): server-rendered pages under
``/console`` for people who run the network (docs/console.md).

An aiohttp sub-application: ``site`` holds what every request goes through
(session, form token, role, audit context), ``auth`` signs in and out, ``pages``
are the screens, ``actions`` the changes, ``charts`` draws SVG. Templates and
static files (htmx, the style sheet) ship in the package.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import jinja2
from aiohttp import web

from ..server import WebServices
from . import actions, auth, pages
from .security import Keys
from .site import CONSOLE, PREFIX, Console, guard

_HERE = Path(__file__).parent


def _routes(app: web.Application) -> None:
    get, post = app.router.add_get, app.router.add_post
    get("/login", auth.login_form)
    post("/login", auth.login)
    post("/logout", auth.logout)
    get("/", pages.overview)
    get("/overview/live", pages.overview_live)
    get("/cards", pages.card_search)
    post("/cards/find", actions.card_find)
    get("/cards/{index:[0-9a-f]{64}}", pages.card)
    post("/cards/{index:[0-9a-f]{64}}/block", actions.card_block)
    post("/cards/{index:[0-9a-f]{64}}/unblock", actions.card_unblock)
    post("/cards/{index:[0-9a-f]{64}}/unlock-pin", actions.card_unlock_pin)
    post("/cards/{index:[0-9a-f]{64}}/reveal", actions.card_reveal)
    get("/merchants", pages.merchants)
    get("/merchants/{merchant_id}", pages.merchant)
    post("/merchants/{merchant_id}/rates", actions.merchant_rates)
    get("/terminals/{terminal_id}", pages.terminal)
    post("/terminals/{terminal_id}/disable", actions.terminal_disable)
    post("/terminals/{terminal_id}/enable", actions.terminal_enable)
    get("/batches", pages.batch_list)
    get("/batches/{terminal_id}/{batch}", pages.batch)
    get("/days", pages.day_list)
    post("/days/close", actions.day_close)
    get("/days/{date}", pages.day)
    get("/days/{date}/clearing.csv", pages.clearing_csv)
    get("/reversals", pages.reversal_list)
    post("/reversals/{reversal_id}/retry", actions.reversal_retry)
    post("/reversals/{reversal_id}/resolve", actions.reversal_resolve)
    get("/audit", pages.audit_trail)
    get("/operators", actions.operator_list)
    post("/operators", actions.operator_add)
    post("/operators/{name}", actions.operator_change)
    app.router.add_static("/static", _HERE / "static", name="static", append_version=True)


def setup_console(app: web.Application, services: WebServices) -> None:
    """Mount the console at ``/console`` on the web layer's application."""
    templates = jinja2.Environment(loader=jinja2.PackageLoader("pointswitch.web.console", "templates"),
                                   autoescape=True)
    console = web.Application(middlewares=[guard])
    console[CONSOLE] = Console(services, Keys(services.ledger.vault.data_key("console_session")), templates,
                               asyncio.Semaphore(services.config.console.max_concurrent_logins))
    templates.globals["static"] = lambda name: console.router["static"].url_for(filename=name)
    _routes(console)
    app.add_subapp(PREFIX, console)

    async def to_console(request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther(f"{PREFIX}/")

    app.router.add_get(PREFIX, to_console)


__all__ = ["setup_console"]
