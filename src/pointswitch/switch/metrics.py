"""Counters and gauges an operator alerts on (Prometheus client, process-wide).

Base units, ``_total`` counters, and no card or terminal ids as labels (a label
per terminal would make an attacker's random ids a memory leak). Exposed by
``[metrics] port`` (off by default); the web layer will serve the same registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
