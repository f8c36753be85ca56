"""Metrics read when ``/metrics`` is scraped, beside the counters the switch keeps
(``switch.metrics``): the database pool, upstream links, reversals waiting by age
and the business day. Base units; labels are connector names (from the settings)
or fixed words, never card or terminal ids.

Pool and links are read from memory by a custom collector at scrape time. What
only the database knows is read by the scrape itself (``refresh``), at most once
per ``min_interval_s`` and within ``timeout_s``: a stalled database delays a
scrape by that much, and the gauges then keep their last values.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import prometheus_client
import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..ledger.gauges import network_state

log = structlog.get_logger("pointswitch.web.metrics")

REVERSALS_WAITING = prometheus_client.Gauge(
    "pointswitch_upstream_reversals_waiting",
    "Reversals waiting to be acknowledged upstream, younger than le seconds (cumulative; +Inf: all)", ["le"])
BUSINESS_DATE = prometheus_client.Gauge(
    "pointswitch_business_date_open_days", "The open business date, as days since 1970-01-01")
DAYS_NOT_CLOSED = prometheus_client.Gauge(
    "pointswitch_business_days_not_closed", "Business days past their cut-off that are not closed yet")


class _Watched(Collector):
    """Pools and connectors of the running switches (one in production)."""

    def __init__(self) -> None:
        self.sources: list[Any] = []  # WebServices

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_use = GaugeMetricFamily("pointswitch_database_pool_connections_in_use",
                                   "Database connections of the pool in use")
        size = GaugeMetricFamily("pointswitch_database_pool_connections", "Database connections the pool holds open")
        limit = GaugeMetricFamily("pointswitch_database_pool_max_connections", "The pool's limit ([database])")
        up = GaugeMetricFamily("pointswitch_upstream_links_up", "Upstream links up", labels=["connector"])
        links = GaugeMetricFamily("pointswitch_upstream_links", "Upstream links configured", labels=["connector"])
        flight = GaugeMetricFamily("pointswitch_upstream_requests_in_flight", "Upstream requests awaiting an answer",
                                   labels=["connector"])
        pools = [s.pool for s in self.sources]
        in_use.add_metric([], sum(p.get_size() - p.get_idle_size() for p in pools))
        size.add_metric([], sum(p.get_size() for p in pools))
        limit.add_metric([], sum(p.get_max_size() for p in pools))
        for services in self.sources:
            for name, connector in services.extra.get("connectors", {}).items():
                state = connector.state()
                up.add_metric([name], state["links_up"])
                links.add_metric([name], state["links"])
                flight.add_metric([name], state["in_flight"])
        yield from (in_use, size, limit, up, links, flight)


WATCHED = _Watched()
prometheus_client.REGISTRY.register(WATCHED)


class DatabaseGauges:
    def __init__(self, services: Any, *, min_interval_s: float = 5.0, timeout_s: float = 2.0):
        self.services = services
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._read_at < self.min_interval_s:
                return
            self._read_at = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout_s):
                    async with self.services.pool.acquire() as con:
                        state = await network_state(con)
            except Exception as exc:  # a scrape never fails for the database: the gauges keep their values
                log.warning("metrics: database state not read", error=type(exc).__name__)
                return
        for le, count in state.reversals_waiting.items():
            REVERSALS_WAITING.labels(le).set(count)
        if state.open_day is not None:
            BUSINESS_DATE.set(state.open_day.toordinal() - 719163)  # date(1970, 1, 1).toordinal()
        DAYS_NOT_CLOSED.set(state.days_not_closed)
