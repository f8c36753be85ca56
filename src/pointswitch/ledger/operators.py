"""Operator accounts of the web console: names, roles, passwords, lockout.

A password is kept only as an scrypt hash (the standard library's memory-hard
KDF: no dependency, and its cost parameters travel with each hash, so they can
be raised later without breaking stored ones). A wrong password counts towards
a lockout; a locked, disabled or unknown account answers exactly as a wrong
password does, after the same work, so a guesser learns nothing from it.

``session_generation`` is part of every session the console issues; raising it
(logout, new password, new role, disabled) ends all of that operator's sessions.
Every change records one audit entry in the transaction of the change.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import audit
from .errors import AdminError

ROLES = ("viewer", "operator", "admin")
_NAME = re.compile(r"[a-z][a-z0-9._-]{1,31}")

# scrypt cost: 2^15 x 8 x 128 bytes = 32 MiB of memory and ~0.1 s of one core per check.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
MAX_PASSWORD_BYTES = 1024  # longer is refused before hashing (no hashing megabytes)


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` (hex), with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P,
                            maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    """Whether ``password`` hashes to ``stored`` (compared in constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode()[:MAX_PASSWORD_BYTES], salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), maxmem=_SCRYPT_MAXMEM, dklen=len(digest) // 2)
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


@functools.cache
def _nobody() -> str:
    """The hash an unknown name is checked against: the same work as a real account.
    Made on first use (an scrypt at import would slow every start-up)."""
    return hash_password(secrets.token_hex(16))


def check_password_rules(password: str, min_length: int) -> None:
    if len(password) < min_length:
        raise AdminError(f"a password is at least {min_length} characters")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise AdminError(f"a password is at most {MAX_PASSWORD_BYTES} bytes")


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise AdminError("an operator name is 2 to 32 characters: a-z first, then a-z, 0-9, '.', '_' or '-'")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise AdminError(f"a role is {', '.join(ROLES)}")


@dataclass(frozen=True)
class Operator:
    operator_id: int
    name: str
    role: str
    session_generation: int

    def may(self, role: str) -> bool:
        """Whether this operator holds ``role`` or one above it."""
        return ROLES.index(self.role) >= ROLES.index(role)


_COLUMNS = ("operator_id, name, role, disabled, failed_logins, locked_until, session_generation, last_login_at,"
            " created_at, password_hash")


def _shown(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "operator_id": row["operator_id"], "name": row["name"], "role": row["role"], "disabled": row["disabled"],
        "failed_logins": row["failed_logins"],
        "locked_until": row["locked_until"].isoformat(timespec="seconds") if row["locked_until"] else None,
        "last_login_at": row["last_login_at"].isoformat(timespec="seconds") if row["last_login_at"] else None,
        "created_at": row["created_at"].isoformat(timespec="seconds"),
    }


async def add_operator(con: asyncpg.Connection, name: str, role: str, password_hash: str) -> dict[str, Any]:
    """A new account; ``password_hash`` from :func:`hash_password` (hashed off the event loop)."""
    _check_name(name)
    _check_role(role)
    async with con.transaction():
        try:
            row = await con.fetchrow(
                f"INSERT INTO operators (name, role, password_hash) VALUES ($1, $2, $3) RETURNING {_COLUMNS}",
                name, role, password_hash)
        except asyncpg.UniqueViolationError:
            raise AdminError(f"operator {name} exists") from None
        await audit.record(con, "operator.add", name, {"role": role})
    return _shown(row)


async def list_operators(con: asyncpg.Connection) -> list[dict[str, Any]]:
    return [_shown(r) for r in await con.fetch(f"SELECT {_COLUMNS} FROM operators ORDER BY name")]


async def _update(con: asyncpg.Connection, name: str, action: str, sets: str, *args: Any,
                  details: dict[str, Any] | None = None) -> dict[str, Any]:
    """One UPDATE of the account ($1 = its name) that also ends its sessions, and its audit entry."""
    async with con.transaction():
        row = await con.fetchrow(
            f"UPDATE operators SET {sets}, session_generation = session_generation + 1, updated_at = now()"
            f" WHERE name = $1 RETURNING {_COLUMNS}", name, *args)
        if row is None:
            raise AdminError(f"no operator {name}")
        await audit.record(con, action, name, details)
    return _shown(row)


async def set_password(con: asyncpg.Connection, name: str, password_hash: str) -> dict[str, Any]:
    """A new password; clears failed logins and a lockout, ends the sessions."""
    return await _update(con, name, "operator.passwd",
                         "password_hash = $2, failed_logins = 0, locked_until = NULL", password_hash)


async def set_role(con: asyncpg.Connection, name: str, role: str) -> dict[str, Any]:
    _check_role(role)
    return await _update(con, name, "operator.role", "role = $2", role, details={"role": role})


async def set_disabled(con: asyncpg.Connection, name: str, disabled: bool) -> dict[str, Any]:
    return await _update(con, name, "operator.disable" if disabled else "operator.enable",
                         "disabled = $2, failed_logins = 0, locked_until = NULL", disabled)


async def end_sessions(con: asyncpg.Connection, operator_id: int) -> None:
    """Logout: every session of this operator is refused from now on."""
    async with con.transaction():
        name = await con.fetchval("UPDATE operators SET session_generation = session_generation + 1"
                                  " WHERE operator_id = $1 RETURNING name", operator_id)
        if name is not None:
            await audit.record(con, "operator.logout", name)


async def signed_in(con: asyncpg.Connection, operator_id: int, generation: int) -> Operator | None:
    """The operator a session names, if that session still stands (same generation, not disabled)."""
    row = await con.fetchrow("SELECT operator_id, name, role, session_generation FROM operators"
                             " WHERE operator_id = $1 AND session_generation = $2 AND NOT disabled",
                             operator_id, generation)
    return Operator(row["operator_id"], row["name"], row["role"], row["session_generation"]) if row else None


async def stored_hash(con: asyncpg.Connection, name: str) -> str:
    """The hash to check a password for ``name`` against; a decoy one for an unknown name."""
    stored: str | None = await con.fetchval("SELECT password_hash FROM operators WHERE name = $1", name)
    return stored or _nobody()


async def record_login(con: asyncpg.Connection, name: str, password_ok: bool, *, max_failed: int,
                       lockout_s: float) -> Operator | None:
    """After the password was checked: the operator now signed in, or None (wrong
    password, unknown, disabled or locked: the caller says the same for all).
    A wrong password counts; the ``max_failed``-th in a row locks the account for
    ``lockout_s``. Failed logins and lockouts are in the audit trail."""
    async with con.transaction():
        row = await con.fetchrow(
            "SELECT operator_id, name, role, disabled, failed_logins, session_generation,"
            " coalesce(locked_until > now(), false) AS locked FROM operators WHERE name = $1 FOR UPDATE", name)
        if row is None:
            return None
        if row["locked"] or row["disabled"]:
            await audit.record(con, "operator.login_refused", name,
                               {"reason": "locked" if row["locked"] else "disabled"})
            return None
        if not password_ok:
            failed = row["failed_logins"] + 1
            locked = failed >= max_failed
            await con.execute(
                "UPDATE operators SET failed_logins = $2,"
                " locked_until = CASE WHEN $3 THEN now() + make_interval(secs => $4) ELSE locked_until END"
                " WHERE operator_id = $1", row["operator_id"], 0 if locked else failed, locked, lockout_s)
            await audit.record(con, "operator.locked" if locked else "operator.login_failed", name,
                               {"failed_logins": failed})
            return None
        await con.execute("UPDATE operators SET failed_logins = 0, locked_until = NULL, last_login_at = now()"
                          " WHERE operator_id = $1", row["operator_id"])
        await audit.record(con, "operator.login", name, actor=name)
    return Operator(row["operator_id"], row["name"], row["role"], row["session_generation"])
