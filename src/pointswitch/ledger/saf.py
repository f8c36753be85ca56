"""Store-and-forward: reversals owed to upstream hosts, kept in PostgreSQL until acknowledged.

A reversal enters the queue in the same transaction that releases a hold (an
unanswered upstream request) or that records a terminal's reversal of an
approved one, so it survives any crash. The switch's forwarder claims due rows
with a lease (``FOR UPDATE SKIP LOCKED``, so two switch processes never send the
same row at once), sends them, and reports back here: acknowledged (the host
approved the reversal; points come back to the card where they were waiting for
it), or retry later with a growing delay, until the row is older than the
maximum age and is expired for an operator.

Operators (``pointswitch admin reversals``) list the rows, make one due again
(``retry_now``), or close one they settled with the host out of band
(``resolve``: ``reversed`` gives the points back exactly as an acknowledgement
does, ``kept`` leaves them paid out). States: pending -> acknowledged | expired
| resolved; expired -> pending (retry) | acknowledged | resolved. Acknowledged
and resolved rows are final: never sent, never settled again.

This is the ledger's second narrow entry point, used by the switch's forwarder
and the operator's ``admin reversals`` command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from typing import Any

import asyncpg
import structlog

from ..logs import mask_pan
from . import audit
from .core import _BUSINESS_DATE
from .holds import _UPSTREAM_ACCOUNT
from .model import CompleteUpstream, Operation, Outcome, RequestKey
from .service import Ledger

log = structlog.get_logger("pointswitch.saf")

_OPEN = ("pending", "expired")  # states a reversal can still leave
OUTCOMES = ("reversed", "kept")  # what an operator's settlement with the host found


class ReversalError(ValueError):
    """An operator action the reversal's state does not allow (or no such reversal)."""


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

    async def _locked(self, con: asyncpg.Connection, reversal_id: int) -> asyncpg.Record | None:
        return await con.fetchrow(
            "SELECT u.*, r.card_index, r.operation, r.terminal_id, r.trace FROM upstream_reversals u"
            " JOIN requests r USING (request_id) WHERE u.reversal_id = $1 FOR UPDATE OF u", reversal_id,
        )

    async def _points_back(self, con: asyncpg.Connection, row: asyncpg.Record, day: date) -> int:
        """The host undid the credit: points waiting for that go back to the card, to the
        lots the hold drew them from (with their original expiry)."""
        points = int(row["points_on_ack"])
        if points:
            moved = await self._ledger._give_back(con, row["card_index"], row["request_id"], points, day)
            source = await self._ledger.operator_account(con, _UPSTREAM_ACCOUNT[Operation(row["operation"])])
            await self._ledger._post(con, row["request_id"], "reversal", source, moved.account, points)
        return points

    async def acknowledged(self, reversal_id: int, upstream_rc: str) -> int:
        """The host approved the reversal (39 = 00 or 25). Points waiting for it go back
        to the card; returns how many (0 when none were waiting, or the reversal was
        already acknowledged or resolved by an operator: never twice)."""
        async with self._pool.acquire() as con, con.transaction():
            day = await con.fetchval(_BUSINESS_DATE)  # before any row lock, as every posting transaction
            row = await self._locked(con, reversal_id)
            if row is None or row["state"] not in _OPEN:
                return 0
            points = await self._points_back(con, row, day)
            await con.execute(
                "UPDATE upstream_reversals SET state = 'acknowledged', acknowledged_at = now(), upstream_rc = $2,"
                " last_error = NULL WHERE reversal_id = $1", reversal_id, upstream_rc,
            )
        log.info("upstream reversal acknowledged", connector=row["connector"], reason=row["reason"],
                 attempts=row["attempts"], terminal=row["terminal_id"], trace=row["trace"], points_back=points,
                 rc=upstream_rc)
        return points

    async def retry_later(self, reversal_id: int, error: str, *, first_s: float, max_s: float,
                          max_age_s: float, upstream_rc: str | None = None) -> None:
        """Not acknowledged this time (no answer, or the host's ``upstream_rc`` refused
        it): try again after a growing delay, or expire it once older than ``max_age_s``
        (counted from the operator's last retry, if any)."""
        async with self._pool.acquire() as con:
            row = await con.fetchrow(
                "UPDATE upstream_reversals SET last_error = $2, upstream_rc = coalesce($6, upstream_rc),"
                " state = CASE WHEN coalesce(retried_at, created_at) < now() - make_interval(secs => $5)"
                " THEN 'expired' ELSE state END,"
                " next_attempt_at = now() + make_interval(secs => least($4, $3 * power(2, least(attempts - 1, 30))))"
                " WHERE reversal_id = $1 AND state = 'pending' RETURNING state, attempts, connector",
                reversal_id, error[:200], first_s, max_s, max_age_s, upstream_rc,
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
                " count(*) FILTER (WHERE state = 'resolved') AS resolved,"
                " extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending'))::float AS oldest_s"
                " FROM upstream_reversals GROUP BY connector"
            )
        keys = ("pending", "expired", "acknowledged", "resolved", "oldest_s")
        return {r["connector"]: {k: r[k] for k in keys} for r in rows}

    async def publish(self, states: dict[str, dict[str, Any]]) -> None:
        """Record each connector's state, with its reversal counts, for ``admin connectors``."""
        stats = await self.stats()
        async with self._pool.acquire() as con:
            await con.executemany(
                "INSERT INTO connector_status (name, state, updated_at) VALUES ($1, $2, now())"
                " ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
                [(name, json.dumps({**state, "reversals": stats.get(name, {})})) for name, state in states.items()],
            )

    # -- operator actions (pointswitch admin reversals) ----------------------------
    async def list_reversals(self, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Reversals, newest first: what an operator needs to settle one with the host.
        No card number: neither the member's nor the bank card the credit went to."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(
                "SELECT u.reversal_id, u.connector, u.reason, u.state, u.attempts, u.points_on_ack,"
                " u.upstream_rc, u.last_error, u.resolved_outcome,"
                " extract(epoch FROM now() - u.created_at)::float AS age_s, u.created_at, u.next_attempt_at,"
                " u.acknowledged_at, u.resolved_at, u.retried_at,"
                " r.operation, r.terminal_id, r.merchant_id, r.trace, r.amount_fen,"
                " r.upstream_reference AS upstream_rrn"
                " FROM upstream_reversals u JOIN requests r USING (request_id)"
                " WHERE ($1::text IS NULL OR u.state = $1) ORDER BY u.reversal_id DESC LIMIT $2",
                state, limit,
            )
        out = []
        for r in rows:
            item = dict(r)
            item["age_s"] = round(item["age_s"], 1)
            item["last_error"] = mask_pan(item["last_error"]) if item["last_error"] else None
            for key in ("created_at", "next_attempt_at", "acknowledged_at", "resolved_at", "retried_at"):
                item[key] = item[key].isoformat(timespec="seconds") if item[key] else None
            out.append(item)
        return out

    async def retry_now(self, reversal_id: int) -> dict[str, Any]:
        """Make an expired (or pending) reversal due now. Its age for expiry counts
        again from now, so it gets ``reversal_max_age_s`` of retries."""
        async with self._pool.acquire() as con, con.transaction():
            row = await self._locked(con, reversal_id)
            self._check_open(row, reversal_id, "retry")
            assert row is not None
            await audit.record(con, "reversal.retry", str(reversal_id),
                               {"connector": row["connector"], "was": row["state"]})
            await con.execute(
                "UPDATE upstream_reversals SET state = 'pending', next_attempt_at = now(), retried_at = now()"
                " WHERE reversal_id = $1", reversal_id,
            )
        log.info("upstream reversal made due again by an operator", reversal_id=reversal_id,
                    connector=row["connector"], was=row["state"])
        return {"reversal_id": reversal_id, "connector": row["connector"], "state": "pending", "was": row["state"]}

    async def resolve(self, reversal_id: int, outcome: str) -> dict[str, Any]:
        """Close a reversal an operator settled with the host out of band: ``reversed``
        (the host undid the credit: points waiting for it go back to the card, the same
        way as an acknowledgement) or ``kept`` (the host kept it: points stay paid out).
        Never sent again; resolving twice is refused."""
        if outcome not in OUTCOMES:
            raise ReversalError(f"the outcome is {' or '.join(OUTCOMES)}, not {outcome!r}")
        async with self._pool.acquire() as con, con.transaction():
            day = await con.fetchval(_BUSINESS_DATE)  # before any row lock, as every posting transaction
            row = await self._locked(con, reversal_id)
            self._check_open(row, reversal_id, "resolve")
            assert row is not None
            points = await self._points_back(con, row, day) if outcome == "reversed" else 0
            await audit.record(con, "reversal.resolve", str(reversal_id),
                               {"connector": row["connector"], "outcome": outcome, "points_back": points})
            await con.execute(
                "UPDATE upstream_reversals SET state = 'resolved', resolved_outcome = $2, resolved_at = now()"
                " WHERE reversal_id = $1", reversal_id, outcome,
            )
        log.info("upstream reversal resolved by an operator", reversal_id=reversal_id, connector=row["connector"],
                 reason=row["reason"], outcome=outcome, terminal=row["terminal_id"], trace=row["trace"],
                 points_back=points)
        result: dict[str, Any] = {"reversal_id": reversal_id, "connector": row["connector"], "reason": row["reason"],
                                  "state": "resolved", "outcome": outcome, "points_back": points}
        if outcome == "kept" and row["reason"] in ("timeout", "lost"):
            # The points went back to the card when the request timed out; the host
            # says it credited the money all the same.
            result["note"] = ("the points went back to the card when the request timed out:"
                              " the member has both the points and the host's credit")
        return result

    @staticmethod
    def _check_open(row: asyncpg.Record | None, reversal_id: int, action: str) -> None:
        if row is None:
            raise ReversalError(f"no reversal {reversal_id}")
        if row["state"] not in _OPEN:
            raise ReversalError(f"cannot {action} reversal {reversal_id}: it is {row['state']} already")
