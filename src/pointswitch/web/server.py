"""The HTTP server of the web layer: one aiohttp application, started beside the
switch's listeners and stopped before them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
import prometheus_client
import structlog
from aiohttp import web

from ..config import Config
from . import metrics
from .api import setup_api

log = structlog.get_logger("pointswitch.web")

SERVICES: web.AppKey[WebServices] = web.AppKey("services")


@dataclass
class WebServices:
    """What the web layer may use: the ledger and its pool (handed to the ledger's
    functions, never queried here), the configuration, and the running parts whose
    state the console shows."""

    config: Config
    pool: asyncpg.Pool
    ledger: Any
    extra: dict[str, Any] = field(default_factory=dict)


GAUGES: web.AppKey[metrics.DatabaseGauges] = web.AppKey("database_gauges")


async def _metrics(request: web.Request) -> web.Response:
    await request.app[GAUGES].refresh()
    body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(services: WebServices) -> web.Application:
    app = web.Application(client_max_size=services.config.http.max_body_bytes)
    app[SERVICES] = services
    app[GAUGES] = metrics.DatabaseGauges(services)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _health)
    setup_api(app, services)
    from .console import setup_console  # the console's modules import this one

    setup_console(app, services)
    return app


class WebServer:
    def __init__(self, services: WebServices) -> None:
        self.services = services
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        http = self.services.config.http
        self._runner = web.AppRunner(build_app(self.services), access_log=None,
                                     shutdown_timeout=http.shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, http.host, http.port, reuse_address=True)
        await site.start()
        metrics.WATCHED.sources.append(self.services)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        host, port = sockets[0].getsockname()[:2] if sockets else (http.host, http.port)
        self.bound = (host, port)
        log.info("web layer serving", host=host, port=port)

    async def stop(self) -> None:
        if self.services in metrics.WATCHED.sources:
            metrics.WATCHED.sources.remove(self.services)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
