"""Store-and-forward: reversals owed to upstream hosts, kept in PostgreSQL until acknowledged.

A reversal enters the queue in the same transaction that releases a hold (an
unanswered upstream request) or that records a terminal's reversal of an
approved one, so it survives any crash. The switch's forwarder claims due rows
with a lease (``FOR UPDATE SKIP LOCKED``, so two switch processes never send the
same row at once), sends them, and reports back here: acknowledged (points come
back to the card where they were waiting for it), or retry later with a growing
delay, until the row is older than the maximum age and is expired for an operator.

This is the ledger's second narrow entry point, used by the switch's forwarder only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import structlog

from .model import CompleteUpstream, Operation, Outcome, RequestKey
from .service import _UPSTREAM_ACCOUNT, Ledger

log = structlog.get_logger("pointswitch.saf")


@dataclass(frozen=True)
class DueReversal:
    reversal_id: int
    connector: str
    message: bytes  # the switch's serialised reversal, unsealed
    attempts: int  # including this one
    reason: str


def parse_key(text: str) -> RequestKey:
    terminal, batch, trace = text.rsplit(":", 2)
    return RequestKey(terminal, int(batch), int(trace))


class ReversalQueue:
    def __init__(self, ledger: Ledger):
        self._ledger = ledger
        self._pool = ledger.pool
        self._vault = ledger._vault


    async def claim(self, connector: str, *, limit: int, lease_s: float) -> list[DueReversal]:
        """Due reversals for ``connector``, leased for ``lease_s`` seconds."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(
                "UPDATE upstream_reversals u SET attempts = u.attempts + 1,"
                " next_attempt_at = now() + make_interval(secs => $3)"
                " FROM requests r WHERE r.request_id = u.request_id AND u.reversal_id IN ("
                "   SELECT reversal_id FROM upstream_reversals WHERE state = 'pending' AND connector = $1"
                "   AND next_attempt_at <= now() ORDER BY reversal_id LIMIT $2 FOR UPDATE SKIP LOCKED)"
                " RETURNING u.reversal_id, u.connector, u.message_sealed, u.attempts, u.reason, r.request_key",
                connector, limit, lease_s,
            )
        return [
            DueReversal(r["reversal_id"], r["connector"],
                        self._vault.open(r["message_sealed"], f"reversal:{r['request_key']}"), r["attempts"],
                        r["reason"])
            for r in rows
        ]

    async def acknowledged(self, reversal_id: int, upstream_rc: str) -> int:
        """The host acknowledged the reversal. Points waiting for it go back to the
        card; returns how many (0 when none were waiting or it was acknowledged before)."""
        async with self._pool.acquire() as con, con.transaction():
            row = await con.fetchrow(
                "SELECT u.*, r.card_index, r.operation, r.terminal_id, r.trace FROM upstream_reversals u"
                " JOIN requests r USING (request_id) WHERE u.reversal_id = $1 FOR UPDATE OF u", reversal_id,
            )
            if row is None or row["state"] == "acknowledged":
                return 0
            points = row["points_on_ack"]
            if points:
                moved = await self._ledger._move_card(con, row["card_index"], points)
                assert moved is not None
                source = await self._ledger.operator_account(con, _UPSTREAM_ACCOUNT[Operation(row["operation"])])
                await self._ledger._post(con, row["request_id"], "reversal", source, moved[2], points)
            await con.execute(
                "UPDATE upstream_reversals SET state = 'acknowledged', acknowledged_at = now(), upstream_rc = $2,"
                " last_error = NULL WHERE reversal_id = $1", reversal_id, upstream_rc,
            )
        log.info("upstream reversal acknowledged", connector=row["connector"], reason=row["reason"],
                 attempts=row["attempts"], terminal=row["terminal_id"], trace=row["trace"], points_back=points)
        return int(points)

    async def retry_later(self, reversal_id: int, error: str, *, first_s: float, max_s: float,
                          max_age_s: float) -> None:
        """Not acknowledged this time: try again after a growing delay, or expire it."""
        async with self._pool.acquire() as con:
            row = await con.fetchrow(
                "UPDATE upstream_reversals SET last_error = $2,"
                " state = CASE WHEN created_at < now() - make_interval(secs => $5) THEN 'expired' ELSE state END,"
                " next_attempt_at = now() + make_interval(secs => least($4, $3 * power(2, least(attempts - 1, 30))))"
                " WHERE reversal_id = $1 AND state = 'pending' RETURNING state, attempts, connector",
                reversal_id, error[:200], first_s, max_s, max_age_s,
            )
        if row is not None and row["state"] == "expired":
            log.error("upstream reversal expired unacknowledged: operator action needed",
                      reversal_id=reversal_id, connector=row["connector"], attempts=row["attempts"], error=error)

    async def time_out_stale(self, *, limit: int = 100) -> list[Outcome]:
        """Pending requests past their deadline (the process that sent them died, or
        their answer never came): released, and their reversals queued."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(
                "SELECT request_key, terminal_id, merchant_id FROM requests"
                " WHERE state = 'pending' AND deadline_at < now() ORDER BY deadline_at LIMIT $1", limit,
            )
        done = []
        for r in rows:
            log.warning("pending upstream request past its deadline: timing it out", terminal=r["terminal_id"])
            done.append(await self._ledger.execute(
                CompleteUpstream(r["terminal_id"], r["merchant_id"], parse_key(r["request_key"]), "lost")))
        return done

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Per connector: reversals pending / expired, and the oldest pending one's age."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(
                "SELECT connector, count(*) FILTER (WHERE state = 'pending') AS pending,"
                " count(*) FILTER (WHERE state = 'expired') AS expired,"
                " count(*) FILTER (WHERE state = 'acknowledged') AS acknowledged,"
                " extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending'))::float AS oldest_s"
                " FROM upstream_reversals GROUP BY connector"
            )
        return {r["connector"]: {k: r[k] for k in ("pending", "expired", "acknowledged", "oldest_s")} for r in rows}

    async def publish(self, states: dict[str, dict[str, Any]]) -> None:
        """Record each connector's state, with its reversal counts, for ``admin connectors``."""
        stats = await self.stats()
        async with self._pool.acquire() as con:
            await con.executemany(
                "INSERT INTO connector_status (name, state, updated_at) VALUES ($1, $2, now())"
                " ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
                [(name, json.dumps({**state, "reversals": stats.get(name, {})})) for name, state in states.items()],
            )
