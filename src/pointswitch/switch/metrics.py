"""Counters and gauges an operator alerts on (Prometheus client, process-wide).

Base units, ``_total`` counters, and no card or terminal ids as labels (a label
per terminal would make an attacker's random ids a memory leak). Exposed by
``[metrics] port`` (off by default) and by the web layer's ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MAC_FAILURES = Counter("pointswitch_mac_failures_total", "Financial messages whose MAC was missing or wrong",
                       ["listener"])
PEERS_BANNED = Counter("pointswitch_peers_banned_total", "Peers refused for a while after too many MAC failures")
SESSIONS_DROPPED = Counter("pointswitch_sessions_dropped_total",
                           "Terminal working keys withdrawn after too many MAC failures")
SIGN_ONS_REFUSED = Counter("pointswitch_sign_ons_refused_total", "Sign-ons refused past their rate limit")
CONNECTIONS_REFUSED = Counter("pointswitch_connections_refused_total", "Connections closed at once",
                              ["reason"])
OVERLOADED = Counter("pointswitch_requests_overloaded_total",
                     "Requests answered 96 at once because max_requests_in_flight were in progress")
CONNECTIONS_OPEN = Gauge("pointswitch_connections_open", "Terminal connections open")
REQUESTS_IN_FLIGHT = Gauge("pointswitch_requests_in_flight", "Requests being processed")
DATABASE_FAILURES = Counter("pointswitch_database_failures_total",
                            "Requests that failed because the database was unavailable")
DATABASE_UP = Gauge("pointswitch_database_up", "1 while requests reach the database, 0 during an outage")
DATABASE_UP.set(1)
UNANSWERED = Counter("pointswitch_requests_unanswered_total",
                     "Requests not answered because the outcome of their commit is unknown", ["reason"])

REQUESTS = Counter("pointswitch_requests_total", "Requests answered (or not: code \"none\"), by listener (an ISO"
                   " listener's name, or \"api\"), operation and response code", ["listener", "operation", "code"])
# Seconds from a request's arrival to its answer; buckets around the milliseconds a POS waits.
REQUEST_DURATION = Histogram("pointswitch_request_duration_seconds", "Time from a request's arrival to its answer",
                             ["listener", "operation"],
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
API_REQUESTS_IN_FLIGHT = Gauge("pointswitch_api_requests_in_flight", "JSON API requests being processed")


class RequestMetrics:
    """The request counter and latency histogram of one listener, their label children
    bound once per (operation, code): a request costs two dictionary lookups."""

    def __init__(self, listener: str):
        self.listener = listener
        self._counts: dict[tuple[str, str], Counter] = {}
        self._durations: dict[str, Histogram] = {}

    def observe(self, operation: str, code: str | None, seconds: float) -> None:
        operation = operation or "unknown"
        key = (operation, code or "none")
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = REQUESTS.labels(self.listener, *key)
        count.inc()
        duration = self._durations.get(operation)
        if duration is None:
            duration = self._durations[operation] = REQUEST_DURATION.labels(self.listener, operation)
        duration.observe(seconds)
