"""What the database says about the network's state, read when ``/metrics`` is
scraped (``web.metrics``): reversals waiting to go upstream by age, and the
business day (the open date, and days past their cut-off not closed yet)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import asyncpg

from .days import calendar

# Upper bounds (seconds) of the ages reversals waiting are counted under, cumulative.
REVERSAL_AGE_BUCKETS_S = (60, 600, 3600, 86400)



@dataclass(frozen=True)
class NetworkState:
    reversals_waiting: dict[str, int] = field(default_factory=dict)  # "le" bound -> count (cumulative; "+Inf")
    open_day: date | None = None
    days_not_closed: int = 0  # days whose cut-off passed and that are not closed


async def network_state(con: asyncpg.Connection) -> NetworkState:
    row = await con.fetchrow(
        "SELECT array(SELECT (SELECT count(*) FROM upstream_reversals WHERE state = 'pending'"
        " AND created_at >= now() - make_interval(secs => u.b)) FROM unnest($1::float8[]) WITH ORDINALITY"
        " AS u(b, n) ORDER BY u.n) AS buckets,"
        " (SELECT count(*) FROM upstream_reversals WHERE state = 'pending') AS total",
        [float(b) for b in REVERSAL_AGE_BUCKETS_S])
    waiting = {str(b): int(n) for b, n in zip(REVERSAL_AGE_BUCKETS_S, row["buckets"], strict=True)}
    waiting["+Inf"] = int(row["total"])
    cal = await calendar(con)
    last_closed = await con.fetchval("SELECT max(business_date) FROM business_days WHERE state = 'closed'")
    first_open = date.fromordinal(last_closed.toordinal() + 1) if last_closed else cal.first_day
    return NetworkState(waiting, cal.open_day, max(0, (cal.open_day - first_open).days))
