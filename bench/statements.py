"""What PostgreSQL spent its time on during the load: ``pg_stat_statements`` (shipped with
the embedded server), loaded by ``throughput.py --statements N``."""

from __future__ import annotations

from typing import Any

from parties import Postgres

_TOP = """
SELECT json_agg(t) FROM (
  SELECT calls, round(total_exec_time::numeric, 1) AS total_ms, round(mean_exec_time::numeric, 3) AS mean_ms,
         rows, wal_bytes, left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query
  FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  ORDER BY total_exec_time DESC LIMIT {limit}) t
"""


def enable(pg: Postgres) -> None:
    """Load the extension's library (a restart of the server)."""
    pg.psql("postgres", "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    pg.psql("postgres", "ALTER SYSTEM SET pg_stat_statements.track = 'all'")
    pg.restart()


def reset(pg: Postgres, database: str) -> None:
    pg.psql(database, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    pg.psql(database, "SELECT pg_stat_statements_reset()")


def top(pg: Postgres, database: str, limit: int) -> list[dict[str, Any]]:
    import json

    out = pg.psql(database, _TOP.format(limit=int(limit))).strip()
    return list(json.loads(out)) if out else []


def render(rows: list[dict[str, Any]], requests: int) -> list[str]:
    lines = ["  statements   calls/request  ms/request   mean ms   query (pg_stat_statements, by total time)"]
    for r in rows:
        per = max(requests, 1)
        lines.append(f"               {r['calls'] / per:>12.2f}  {r['total_ms'] / per:>10.4f}  {r['mean_ms']:>8.3f}"
                     f"   {r['query']}")
    return lines
