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


def test_the_web_layer_is_configured_by_http_and_the_environment(tmp_path) -> None:
    from pointswitch.config import ConfigError, load

    path = tmp_path / "switch.toml"
    path.write_text('[http]\nhost = "0.0.0.0"\nport = 9090\n')
    cfg = load(path, env={})
    assert (cfg.http.enabled, cfg.http.host, cfg.http.port) == (True, "0.0.0.0", 9090)
    assert load(path, env={"POINTSWITCH_HTTP_PORT": "0"}).http.port == 0
    assert load(None, env={"POINTSWITCH_HTTP_ENABLED": "false"}).http.enabled is False
    assert load(None, env={}).http.port == 8080
    path.write_text("[http]\nport = 'x'\n")
    import pytest

    with pytest.raises(ConfigError, match="http.port"):
        load(path, env={})
