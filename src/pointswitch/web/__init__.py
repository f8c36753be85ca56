"""The web layer: the operator console, the JSON API for PC and mobile terminals,
and ``/metrics``, served by aiohttp in the switch's own process and event loop
(docs/architecture.md, decision 43).

It talks to the ledger through the ledger's own functions, as routing does; no SQL
lives here. ``WebServer`` starts and stops it; ``build_app`` assembles the parts.
"""

from __future__ import annotations

from .server import WebServer, WebServices, build_app

__all__ = ["WebServer", "WebServices", "build_app"]
