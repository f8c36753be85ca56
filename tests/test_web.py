"""The web layer over real HTTP: served in the switch's own process and loop."""

from __future__ import annotations

import aiohttp

from .conftest import SwitchUnderTest


async def test_metrics_are_served_in_prometheus_format_beside_the_switch(switch: SwitchUnderTest) -> None:
    host, port = switch.http
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}:{port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = await resp.text()
        assert "pointswitch_connections_open" in body
        async with http.get(f"http://{host}:{port}/healthz") as resp:
            assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
        async with http.get(f"http://{host}:{port}/no-such-page") as resp:
            assert resp.status == 404
