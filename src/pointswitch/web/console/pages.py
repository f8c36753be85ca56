"""The console's screens (GET): each gathers what it shows through the ledger's
functions and renders one template. Nothing here changes anything."""

from __future__ import annotations

from datetime import date
from typing import Any

from aiohttp import web

from ...ledger import admin, audit, batches, clearing, days, outbox, views
from ...ledger.errors import AdminError
from ...ledger.saf import ReversalQueue
from ...routing.codes import FOR_STATUS
from . import charts
from .site import console, render, services


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise web.HTTPNotFound(text="not a date") from None


def _rows(request: web.Request) -> int:
    rows: int = console(request).settings.page_rows
    return rows


async def overview(request: web.Request) -> web.Response:
    return render(request, "overview.html", **await _live(request))


async def overview_live(request: web.Request) -> web.Response:
    """The overview's live part, which htmx fetches again every few seconds."""
    return render(request, "overview_live.html", **await _live(request))


async def _live(request: web.Request) -> dict[str, Any]:
    svc = services(request)
    async with svc.pool.acquire() as con:
        traffic = await views.traffic(con)
        reported = {c["name"]: c for c in await admin.connectors(con)}
    day_list = await days.list_days(svc.pool, limit=1)
    reversal_stats = await ReversalQueue(svc.ledger).stats()
    live = {name: c.state() for name, c in svc.extra.get("connectors", {}).items()}
    minutes = traffic["minutes"]
    per_second = [round(m["requests"] / 60, 2) for m in minutes]
    codes = {f"{FOR_STATUS.get(_status(s), '??')} {s}": n for s, n in traffic["by_status"].items()}
    return {
        "traffic": traffic, "day": day_list,
        "tps_chart": charts.bars([m["at"][11:16] for m in minutes], {"transactions per second": per_second},
                                 title="transactions per second, averaged per minute, last hour", label_every=10),
        "codes_chart": charts.share(codes, title="answers by response code, last hour"),
        "tps_now": round(sum(m["requests"] for m in minutes[-5:]) / 300, 2),
        "connectors": [{"name": n, "state": live.get(n) or reported.get(n, {}).get("state", {}),
                        "reversals": reversal_stats.get(n, {})} for n in sorted(set(live) | set(reported))],
        "reversals_waiting": sum((s.get("pending") or 0) + (s.get("expired") or 0) for s in reversal_stats.values()),
    }


def _status(text: str) -> Any:
    from ...ledger.model import Status

    try:
        return Status(text)
    except ValueError:
        return None


async def card_search(request: web.Request) -> web.Response:
    return render(request, "card_search.html")


async def card(request: web.Request) -> web.Response:
    svc = services(request)
    async with svc.pool.acquire() as con:
        try:
            shown = await admin.card_view(con, svc.ledger.vault, request.match_info["index"], _rows(request))
        except AdminError:
            raise web.HTTPNotFound(text="no such card") from None
        messages = await outbox.list_messages(con, recipient_ref=request.match_info["index"], limit=_rows(request))
    return render(request, "card.html", card=shown, index=request.match_info["index"], messages=messages)


async def merchants(request: web.Request) -> web.Response:
    async with services(request).pool.acquire() as con:
        rows = await admin.list_merchants(con)
    return render(request, "merchants.html", merchants=rows)


async def merchant(request: web.Request) -> web.Response:
    merchant_id = request.match_info["merchant_id"]
    async with services(request).pool.acquire() as con:
        try:
            shown = await admin.get_merchant(con, merchant_id)
        except AdminError:
            raise web.HTTPNotFound(text="no such merchant") from None
        terminals = await admin.list_terminals(con, merchant_id=merchant_id)
        per_day = await views.merchant_days(con, merchant_id)
        positions = await views.clearing_positions(con, merchant_id)
    chart = charts.bars([d["business_date"][5:] for d in per_day],
                        {"issued": [d["points_issued"] for d in per_day],
                         "redeemed": [d["points_redeemed"] for d in per_day]},
                        title=f"points issued and redeemed per business day at {merchant_id}",
                        label_every=5)
    return render(request, "merchant.html", merchant=shown, terminals=terminals, per_day=per_day, chart=chart,
                  positions=positions)


async def terminal(request: web.Request) -> web.Response:
    terminal_id = request.match_info["terminal_id"]
    async with services(request).pool.acquire() as con:
        found = await admin.list_terminals(con, terminal_id=terminal_id)
        if not found:
            raise web.HTTPNotFound(text="no such terminal")
        shown = found[0]
        recent = await views.terminal_requests(con, terminal_id, shown["current_batch"], limit=_rows(request))
        settlements = await batches.list_settlements(con, terminal_id=terminal_id, limit=10)
    return render(request, "terminal.html", terminal=shown, recent=recent, settlements=settlements,
                  codes=_codes(recent))


def _codes(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {r["status"]: FOR_STATUS.get(_status(r["status"]), "??") for r in rows}


async def batch_list(request: web.Request) -> web.Response:
    day = request.query.get("date")
    async with services(request).pool.acquire() as con:
        rows = await batches.list_settlements(con, terminal_id=request.query.get("terminal") or None,
                                              business_date=_day(day) if day else None, limit=_rows(request))
    return render(request, "batches.html", settlements=rows)


async def batch(request: web.Request) -> web.Response:
    try:
        number = int(request.match_info["batch"])
    except ValueError:
        raise web.HTTPNotFound(text="not a batch number") from None
    async with services(request).pool.acquire() as con:
        shown = await batches.show_settlement(con, request.match_info["terminal_id"], number)
    if shown is None:
        raise web.HTTPNotFound(text="no such settlement")
    return render(request, "batch.html", s=shown)


async def day_list(request: web.Request) -> web.Response:
    return render(request, "days.html", days=await days.list_days(services(request).pool, limit=_rows(request)))


async def day(request: web.Request) -> web.Response:
    report = await days.day_report(services(request).pool, _day(request.match_info["date"]))
    if report is None:
        raise web.HTTPNotFound(text="that business day was never cut off")
    return render(request, "day.html", report=report)


async def clearing_csv(request: web.Request) -> web.Response:
    report = await days.day_report(services(request).pool, _day(request.match_info["date"]))
    if report is None or report.get("state") != "closed":
        raise web.HTTPNotFound(text="that business day is not closed: no clearing yet")
    name = f"clearing-{report['business_date'].replace('-', '')}.csv"
    return web.Response(text=clearing.render_csv(report), content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})


async def reversal_list(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    if state not in (None, "pending", "expired", "acknowledged", "resolved"):
        state = None
    rows = await ReversalQueue(services(request).ledger).list_reversals(state=state, limit=_rows(request))
    return render(request, "reversals.html", reversals=rows, state=state)


async def audit_trail(request: web.Request) -> web.Response:
    async with services(request).pool.acquire() as con:
        rows = await audit.entries(con, limit=_rows(request), actor=request.query.get("actor") or None,
                                   action=request.query.get("action") or None)
    return render(request, "audit.html", entries=list(reversed(rows)))
