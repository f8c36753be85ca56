"""The outbox: messages queued by the database's triggers (migration 0013), and
the queries of the workers that deliver them (``pointswitch.messages``).

A worker claims due rows with FOR UPDATE SKIP LOCKED inside a transaction, sends
them, and marks each delivered, retried or failed in that same transaction after
the channel answered. A worker that dies before its commit leaves its rows
unclaimed and unmarked: another worker sends them again under the same
idempotency key, which a channel that honours it takes once.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import audit
from .errors import AdminError
from .vault import Vault, VaultError

NOTIFY_CHANNEL = "pointswitch_outbox"

_CLAIM = """
SELECT o.message_id, o.kind, o.recipient_kind, o.recipient_ref, o.channel, o.idempotency_key, o.payload,
       o.language, greatest(o.created_at, o.retried_at) AS since, o.attempts, c.contact_id, c.opt_in,
       c.address_sealed, c.secret_sealed,
       r.outcome -> 'points_balance' AS points_balance
FROM outbox o JOIN contacts c USING (contact_id) LEFT JOIN requests r ON r.request_id = o.request_id
WHERE o.delivered_at IS NULL AND o.failed_at IS NULL AND o.next_attempt_at <= now() AND o.channel = ANY($1::text[])
ORDER BY o.next_attempt_at
LIMIT $2
FOR UPDATE OF o SKIP LOCKED
"""


@dataclass(frozen=True)
class Message:
    """A claimed message, with its contact's address and secret unsealed."""

    message_id: int
    kind: str
    recipient_kind: str
    recipient_ref: str
    channel: str
    idempotency_key: str
    payload: dict[str, Any]
    language: str
    since: datetime.datetime  # queued (or retried by an operator): its maximum age counts from here
    attempts: int
    opt_in: bool
    address: str
    secret: bytes | None

    def __repr__(self) -> str:  # never the address or the secret
        return f"Message({self.message_id}, {self.kind}, {self.channel}, key={self.idempotency_key})"


def _unseal(vault: Vault, row: asyncpg.Record) -> Message:
    context = f"contact:{row['recipient_kind']}:{row['recipient_ref']}:{row['channel']}"
    payload = json.loads(row["payload"])
    if row["points_balance"] is not None:  # the request's outcome as committed (group commit may restate it)
        payload["points_balance"] = json.loads(row["points_balance"])
    return Message(
        row["message_id"], row["kind"], row["recipient_kind"], row["recipient_ref"], row["channel"],
        row["idempotency_key"], payload, row["language"], row["since"], row["attempts"], row["opt_in"],
        vault.open(row["address_sealed"], context).decode(),
        vault.open(row["secret_sealed"], f"contact-secret:{context}") if row["secret_sealed"] is not None else None,
    )


async def claim(con: asyncpg.Connection, vault: Vault, channels: Sequence[str], limit: int) -> list[Message]:
    """Due messages of ``channels``, locked until ``con``'s transaction ends; others skip them.
    A message whose contact does not open under this vault is failed here (it never would)."""
    claimed = []
    for row in await con.fetch(_CLAIM, list(channels), limit):
        try:
            claimed.append(_unseal(vault, row))
        except VaultError:
            await mark_failed(con, row["message_id"], "the contact does not open under this master key",
                              attempted=False)
    return claimed


async def delivered_last_hour(con: asyncpg.Connection, recipients: Sequence[tuple[str, str]]
                              ) -> dict[tuple[str, str], tuple[int, datetime.datetime | None]]:
    """For each (recipient ref, channel): messages delivered within the last hour and the oldest's time."""
    if not recipients:
        return {}
    rows = await con.fetch(
        "SELECT o.recipient_ref, o.channel, count(*) AS n, min(o.delivered_at) AS oldest"
        " FROM outbox o JOIN unnest($1::text[], $2::text[]) AS w(ref, channel)"
        "   ON o.recipient_ref = w.ref AND o.channel = w.channel"
        " WHERE o.created_at > now() - interval '1 day' AND o.delivered_at > now() - interval '1 hour'"
        " GROUP BY o.recipient_ref, o.channel",
        [r for r, _c in recipients], [c for _r, c in recipients])
    return {(r["recipient_ref"], r["channel"]): (r["n"], r["oldest"]) for r in rows}


async def mark_delivered(con: asyncpg.Connection, message_id: int) -> None:
    await con.execute("UPDATE outbox SET delivered_at = now(), attempts = attempts + 1, last_error = NULL"
                      " WHERE message_id = $1", message_id)


async def mark_retry(con: asyncpg.Connection, message_id: int, delay_s: float, error: str) -> None:
    await con.execute("UPDATE outbox SET attempts = attempts + 1, last_error = $3,"
                      " next_attempt_at = now() + make_interval(secs => $2) WHERE message_id = $1",
                      message_id, delay_s, error[:500])


async def mark_failed(con: asyncpg.Connection, message_id: int, error: str, *, attempted: bool = True) -> None:
    await con.execute("UPDATE outbox SET failed_at = now(), attempts = attempts + $3::int, last_error = $2"
                      " WHERE message_id = $1", message_id, error[:500], 1 if attempted else 0)


async def defer(con: asyncpg.Connection, message_id: int, until: datetime.datetime, reason: str) -> None:
    """Hold a message (quiet hours, rate limit) until ``until``; not an attempt."""
    await con.execute("UPDATE outbox SET not_before = $2, next_attempt_at = $2, last_error = $3"
                      " WHERE message_id = $1", message_id, until, reason)


async def queue_points_expiring(con: asyncpg.Connection, within_days: int) -> int:
    """Queue the warnings for points expiring within ``within_days`` of the open
    business date (once per card, expiry date and contact). Returns how many were new."""
    return int(await con.fetchval(
        "SELECT outbox_points_expiring(business_date_at(now(), c.cutoff, c.time_zone), $1) FROM business_calendar c",
        within_days))


async def give_up_old(con: asyncpg.Connection, max_age_s: float) -> dict[str, int]:
    """Fail every waiting message older than ``max_age_s`` (of a channel switched off,
    or held for long), so that the outbox does not grow without bound. Per channel:
    how many. Rows a worker holds are left to it (it applies the same age)."""
    rows = await con.fetch(
        "WITH old AS (SELECT message_id FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
        "             AND greatest(created_at, retried_at) < now() - make_interval(secs => $1)"
        "             FOR UPDATE SKIP LOCKED),"
        " failed AS (UPDATE outbox o SET failed_at = now(), last_error = 'not delivered within max_age_s'"
        "            FROM old WHERE o.message_id = old.message_id RETURNING o.channel)"
        " SELECT channel, count(*) AS n FROM failed GROUP BY channel", max_age_s)
    return {r["channel"]: r["n"] for r in rows}


async def next_due(con: asyncpg.Connection, channels: list[str]) -> datetime.datetime | None:
    """When the soonest waiting message of these channels is due (None: none waits)."""
    due: datetime.datetime | None = await con.fetchval(
        "SELECT min(next_attempt_at) FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
        " AND channel = ANY($1::text[])", channels)
    return due


async def waiting(con: asyncpg.Connection) -> dict[str, int]:
    """Messages not yet delivered nor failed, per channel."""
    rows = await con.fetch("SELECT channel, count(*) AS n FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
                           " GROUP BY channel")
    return {r["channel"]: r["n"] for r in rows}


def _listed(r: asyncpg.Record) -> dict[str, Any]:
    state = "delivered" if r["delivered_at"] else "failed" if r["failed_at"] else "waiting"
    return {
        "message_id": r["message_id"], "kind": r["kind"], "recipient_kind": r["recipient_kind"],
        "recipient": r["recipient"], "channel": r["channel"], "address": r["address_display"], "state": state,
        "attempts": r["attempts"], "created_at": r["created_at"].isoformat(timespec="seconds"),
        "next_attempt_at": r["next_attempt_at"].isoformat(timespec="seconds") if state == "waiting" else None,
        "delivered_at": r["delivered_at"].isoformat(timespec="seconds") if r["delivered_at"] else None,
        "failed_at": r["failed_at"].isoformat(timespec="seconds") if r["failed_at"] else None,
        "last_error": r["last_error"],
    }


async def list_messages(con: asyncpg.Connection, *, failed: bool = False, recipient_ref: str | None = None,
                        limit: int = 50) -> list[dict[str, Any]]:
    """The latest messages (newest first); a member shows as the masked card number."""
    rows = await con.fetch(
        "SELECT o.*, c.address_display, CASE WHEN o.recipient_kind = 'member' THEN o.payload ->> 'card'"
        " ELSE o.recipient_ref END AS recipient FROM outbox o JOIN contacts c USING (contact_id)"
        " WHERE ($1 = false OR o.failed_at IS NOT NULL) AND ($2::text IS NULL OR o.recipient_ref = $2)"
        " ORDER BY o.message_id DESC LIMIT $3", failed, recipient_ref, limit)
    return [_listed(r) for r in rows]


async def retry(con: asyncpg.Connection, message_id: int) -> dict[str, Any]:
    """Send a failed message again (its attempts start over), now."""
    async with con.transaction():
        done = await con.execute(
            "UPDATE outbox SET failed_at = NULL, attempts = 0, next_attempt_at = now(), not_before = NULL,"
            " retried_at = now() WHERE message_id = $1 AND failed_at IS NOT NULL", message_id)
        if done.endswith(" 0"):
            raise AdminError(f"no failed message {message_id}")
        await con.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        await audit.record(con, "message.retry", str(message_id))
    rows = await con.fetch(
        "SELECT o.*, c.address_display, CASE WHEN o.recipient_kind = 'member' THEN o.payload ->> 'card'"
        " ELSE o.recipient_ref END AS recipient FROM outbox o JOIN contacts c USING (contact_id)"
        " WHERE o.message_id = $1", message_id)
    return _listed(rows[0])
