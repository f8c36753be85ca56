"""``/metrics`` scraped over HTTP after ISO and API requests: the counters moved under
the right labels, the gauges read at scrape time are there, and no card or terminal
id appears anywhere in it."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .api_support import api_client, base_url
from .conftest import TEST_PIN

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"


async def _scrape(switch) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    async with aiohttp.ClientSession() as http, http.get(base_url(switch) + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_iso_and_api_requests_by_listener_operation_and_code(switch, network):
    api = await api_client(switch, network)
    card = network.cards[0]
    _, before = await _scrape(switch)
    async with network.terminal(0) as pos:
        for _ in range(3):
            assert (await pos.accrue(card, 1000)).rc == "00"
    for _ in range(2):
        assert (await api.post("/accrue", {"card": card, "amount_fen": 1000})).code == "00"
    assert (await api.post("/redeem", {"card": card, "amount_fen": 10_000, "pin": TEST_PIN})).code == "51"
    assert (await api.post("/accrue", {"card": card, "amount_fen": 1}, sign_with=b"x")).status == 401
    text, after = await _scrape(switch)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("pointswitch_requests_total", listener="cup", operation="accrue", code="00") == 3
    assert moved("pointswitch_requests_total", listener="api", operation="accrue", code="00") == 2
    assert moved("pointswitch_requests_total", listener="api", operation="redeem", code="51") == 1
    assert moved("pointswitch_requests_total", listener="api", operation="accrue", code="A0") == 1
    assert moved("pointswitch_request_duration_seconds_count", listener="api", operation="accrue") == 3
    assert moved("pointswitch_request_duration_seconds_count", listener="cup", operation="accrue") == 3
    assert _value(after, "pointswitch_database_pool_max_connections") >= switch.config.database.pool_max_size
    assert ("pointswitch_database_pool_connections_in_use", ()) in after
    assert ("pointswitch_api_requests_in_flight", ()) in after
    assert _value(after, "pointswitch_upstream_reversals_waiting", le="+Inf") >= 0
    assert ("pointswitch_upstream_reversals_waiting", (("le", "60"),)) in after
    assert _value(after, "pointswitch_business_date_open_days") > 20_000  # days since 1970: a date after 2024
    assert ("pointswitch_business_days_not_closed", ()) in after
    assert ("pointswitch_connections_open", ()) in after
    for secret in (card, *network.cards, *network.terminal_ids, *network.iso87_terminal_ids, network.merchant_id):
        assert secret not in text


async def test_the_grafana_dashboard_asks_only_for_metrics_the_switch_serves(switch):
    import json
    import re
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    asked = {re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"pointswitch_[a-z_]+", e)}
    text, _ = await _scrape(switch)
    served = set(re.findall(r"^# TYPE (pointswitch_[a-z_]+)", text, re.M))
    served |= {re.sub(r"_total$", "", name) for name in served} | {f"{n}_total" for n in served}
    assert asked and asked <= served, asked - served
