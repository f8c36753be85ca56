"""The audit trail: who changed what, from where, and who looked at card data.

Every admin action that changes something records one entry with
:func:`record`, on the same connection and inside the same transaction as the
change, so an entry exists exactly when its change committed. A target names
what was acted on in a form that may be shown to anyone (masked card number,
terminal or merchant id); details never hold a secret.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import asyncpg

# Detail keys that would carry a secret or clear card data: refused outright.
_FORBIDDEN_DETAILS = {"pin", "pin_hash", "tmk", "key", "pik", "mak", "tdk", "card_number", "pan", "holder_name",
                      "phone"}
_MASKED_PAN = re.compile(r"[0-9]{6}[*]{2,9}[0-9]{4}")


# Who acts, and from where, when it is not this process's OS user at its terminal:
# the web console names the operator signed in and the address of their browser.
_ACTING: ContextVar[tuple[str, str] | None] = ContextVar("audit_acting", default=None)


@contextmanager
def acting_as(actor: str, where: str) -> Iterator[None]:
    """Entries recorded inside (in this task) name ``actor`` and ``where``."""
    token = _ACTING.set((actor, where))
    try:
        yield
    finally:
        _ACTING.reset(token)


def current_actor() -> str:
    """The actor entries recorded now would name."""
    acting = _ACTING.get()
    return acting[0] if acting else os_user()


class AuditError(ValueError):
    """An entry that would store a secret or a clear card number."""


def os_user() -> str:
    """The operating-system user running this process (the effective user, not $USER)."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):  # no passwd entry (a container's bare uid), or not Unix
        import getpass

        try:
            return getpass.getuser()
        except OSError:
            return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def origin() -> str:
    """Where the action came from: host name, process id, and the terminal if there is one."""
    parts = [socket.gethostname(), f"pid {os.getpid()}"]
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                parts.append(f"tty {os.ttyname(fd)}")
                break
        except OSError:
            continue
    return " ".join(parts)


def _check(action: str, target: str, details: dict[str, Any]) -> None:
    bad = _FORBIDDEN_DETAILS & set(details)
    if bad:
        raise AuditError(f"audit details must not hold {', '.join(sorted(bad))}")
    # Shape alone cannot tell a 15-digit merchant id from a card number, but the
    # action can: the target of a card action is the masked number, nothing else.
    if action.startswith("card.") and not _MASKED_PAN.fullmatch(target):
        raise AuditError("the target of a card action is the masked card number")


async def record(con: asyncpg.Connection, action: str, target: str, details: dict[str, Any] | None = None,
                 actor: str | None = None) -> int:
    """Append one entry; returns its id. Call it inside the transaction of the change."""
    details = details or {}
    _check(action, target, details)
    acting = _ACTING.get()
    return int(await con.fetchval(
        "INSERT INTO audit_log (actor, action, target, details, origin) VALUES ($1, $2, $3, $4, $5)"
        " RETURNING audit_id",
        actor or (acting[0] if acting else os_user()), action, target, json.dumps(details, default=str),
        acting[1] if acting else origin(),
    ))


async def entries(con: asyncpg.Connection, *, since: datetime | None = None, limit: int = 100,
                  actor: str | None = None, action: str | None = None) -> list[dict[str, Any]]:
    """The latest ``limit`` entries at or after ``since`` (of one actor, of actions
    starting with ``action``), oldest first."""
    if limit < 1:
        raise ValueError("limit is at least 1")
    rows = await con.fetch(
        "SELECT * FROM (SELECT audit_id, at, actor, action, target, details, origin FROM audit_log"
        " WHERE ($1::timestamptz IS NULL OR at >= $1) AND ($3::text IS NULL OR actor = $3)"
        " AND ($4::text IS NULL OR starts_with(action, $4)) ORDER BY audit_id DESC LIMIT $2) e ORDER BY audit_id",
        since, limit, actor, action,
    )
    return [
        {
            "id": r["audit_id"],
            "at": r["at"].isoformat(),
            "actor": r["actor"],
            "action": r["action"],
            "target": r["target"],
            "details": json.loads(r["details"]),
            "origin": r["origin"],
        }
        for r in rows
    ]
