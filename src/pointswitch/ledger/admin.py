"""Operator functions over the ledger: merchants, terminals, load-test data, invariants.

Cards are in :mod:`.cards` (re-exported here). Used by ``pointswitch admin``;
they work while the switch runs (plain transactions on the same database).
Every function that changes something records one audit entry in the same
transaction as the change.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg

from ..codecs import crypto
from . import audit
from .carddata import mask_card
from .cards import add_card, add_cards_in_bulk, set_card_status, set_pin, show_card, unlock_pin
from .errors import AdminError
from .pins import hash_pin
from .vault import Vault

__all__ = [
    "AdminError", "add_card", "add_cards_in_bulk", "add_merchant", "add_terminal", "check_invariants", "connectors",
    "get_merchant", "hash_pin", "list_merchants", "list_terminals", "mask_card", "rekey_terminal", "seed",
    "set_card_status", "set_pin", "set_terminal_status", "show_card", "unlock_pin", "update_merchant",
    "upstream_reversals",
]


def _decimal(value: Any, what: str) -> Decimal:
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise AdminError(f"{what} must be a number") from None
    if d < 0 or d != d.quantize(Decimal("0.0001")):
        raise AdminError(f"{what} must be >= 0 with at most 4 decimals")
    return d


async def _account(con: asyncpg.Connection, kind: str, owner: str) -> int:
    return int(await con.fetchval(
        "INSERT INTO accounts (kind, owner) VALUES ($1, $2)"
        " ON CONFLICT (kind, owner) DO UPDATE SET owner = EXCLUDED.owner RETURNING account_id",
        kind, owner,
    ))


# -- merchants ---------------------------------------------------------------------
def _rates(earn_rate: Any, issue_price: Any, redeem_value: Any) -> tuple[Decimal, Decimal, Decimal]:
    rate = _decimal(earn_rate, "earn rate")
    price = _decimal(issue_price, "issue price")
    value = _decimal(redeem_value, "redemption value")
    if value == 0:
        raise AdminError("redemption value per point must be above zero")
    return rate, price, value


async def _insert_merchant(con: asyncpg.Connection, merchant_id: str, name: str, rate: Decimal, price: Decimal,
                           value: Decimal) -> None:
    issued = await _account(con, "merchant_issued", merchant_id)
    redeemed = await _account(con, "merchant_redeemed", merchant_id)
    try:
        await con.execute(
            "INSERT INTO merchants (merchant_id, name, earn_rate_points_per_yuan,"
            " issue_price_fen_per_point, redeem_value_fen_per_point, issued_account_id,"
            " redeemed_account_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            merchant_id, name, rate, price, value, issued, redeemed,
        )
    except asyncpg.UniqueViolationError:
        raise AdminError(f"merchant {merchant_id} exists") from None


async def add_merchant(con: asyncpg.Connection, merchant_id: str, name: str, earn_rate: Any,
                       issue_price: Any = 1, redeem_value: Any = 1) -> dict[str, Any]:
    if not re.fullmatch(r"[\x21-\x7e]{1,15}", merchant_id):
        raise AdminError("a merchant id is 1 to 15 printable characters (field 42)")
    rate, price, value = _rates(earn_rate, issue_price, redeem_value)
    async with con.transaction():
        await _insert_merchant(con, merchant_id, name, rate, price, value)
        await audit.record(con, "merchant.add", merchant_id, {
            "name": name, "earn_rate_points_per_yuan": str(rate), "issue_price_fen_per_point": str(price),
            "redeem_value_fen_per_point": str(value)})
    return await get_merchant(con, merchant_id)


_MERCHANT_COLUMNS = ("name", "earn_rate_points_per_yuan", "issue_price_fen_per_point", "redeem_value_fen_per_point",
                     "status")


async def update_merchant(con: asyncpg.Connection, merchant_id: str, *, name: str | None = None,
                          earn_rate: Any = None, issue_price: Any = None, redeem_value: Any = None,
                          status: str | None = None) -> dict[str, Any]:
    """Change a merchant's name, rates or status (``active``, ``suspended``: its
    terminals are declined 03). Only what is given changes; nothing given is refused."""
    if status is not None and status not in ("active", "suspended"):
        raise AdminError("merchant status is active or suspended")
    async with con.transaction():
        row = await con.fetchrow("SELECT * FROM merchants WHERE merchant_id = $1 FOR UPDATE", merchant_id)
        if row is None:
            raise AdminError(f"no merchant {merchant_id}")
        given = [name, earn_rate, issue_price, redeem_value, status]
        if all(v is None for v in given):
            raise AdminError("nothing to change: give a name, a rate or a status")
        old = [row[c] for c in _MERCHANT_COLUMNS]
        rate, price, value = _rates(*(old[i] if given[i] is None else given[i] for i in (1, 2, 3)))
        new = [name if name is not None else row["name"], rate, price, value, status or row["status"]]
        changes = {c: [_shown(o), _shown(n)] for c, o, n in zip(_MERCHANT_COLUMNS, old, new, strict=True) if o != n}
        if changes:
            await con.execute(
                "UPDATE merchants SET name = $2, earn_rate_points_per_yuan = $3, issue_price_fen_per_point = $4,"
                " redeem_value_fen_per_point = $5, status = $6 WHERE merchant_id = $1", merchant_id, *new)
            await audit.record(con, "merchant.update", merchant_id, {"changes": changes})
    return await get_merchant(con, merchant_id)


def _shown(value: Any) -> str:
    return str(value.normalize()) if isinstance(value, Decimal) else str(value)


async def get_merchant(con: asyncpg.Connection, merchant_id: str) -> dict[str, Any]:
    row = await con.fetchrow(_MERCHANTS + " WHERE m.merchant_id = $1", merchant_id)
    if row is None:
        raise AdminError(f"no merchant {merchant_id}")
    return _merchant(row)


_MERCHANTS = """
SELECT m.merchant_id, m.name, m.earn_rate_points_per_yuan, m.issue_price_fen_per_point,
       m.redeem_value_fen_per_point, m.status,
       (SELECT count(*) FROM terminals t WHERE t.merchant_id = m.merchant_id) AS terminals,
       -(SELECT balance_points FROM account_balances WHERE account_id = m.issued_account_id) AS points_issued,
       (SELECT balance_points FROM account_balances WHERE account_id = m.redeemed_account_id) AS points_redeemed
FROM merchants m
"""


def _merchant(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "merchant_id": row["merchant_id"],
        "name": row["name"],
        "earn_rate_points_per_yuan": str(row["earn_rate_points_per_yuan"].normalize()),
        "issue_price_fen_per_point": str(row["issue_price_fen_per_point"].normalize()),
        "redeem_value_fen_per_point": str(row["redeem_value_fen_per_point"].normalize()),
        "status": row["status"],
        "terminals": row["terminals"],
        "points_issued": int(row["points_issued"] or 0),
        "points_redeemed": int(row["points_redeemed"] or 0),
    }


async def list_merchants(con: asyncpg.Connection) -> list[dict[str, Any]]:
    return [_merchant(r) for r in await con.fetch(_MERCHANTS + " ORDER BY m.merchant_id")]


def _tmk(tmk_hex: str | None) -> bytes:
    if tmk_hex is None:
        return crypto.generate_key(16)
    try:
        tmk = bytes.fromhex(tmk_hex)
    except ValueError:
        raise AdminError("a terminal master key is 32 hex digits") from None
    if len(tmk) != 16:
        raise AdminError("a terminal master key is 16 bytes (32 hex digits), double-length 3DES")
    return tmk


def _with_key(terminal: dict[str, Any], tmk: bytes) -> dict[str, Any]:
    """The terminal as listed, plus its master key in clear: shown once, to load the terminal."""
    return {**terminal, "tmk": tmk.hex().upper(), "tmk_check_value": crypto.check_value(tmk).hex().upper()}


async def _insert_terminal(con: asyncpg.Connection, vault: Vault, terminal_id: str, merchant_id: str,
                           status: str, tmk: bytes) -> None:
    try:
        await con.execute(
            "INSERT INTO terminals (terminal_id, merchant_id, status, tmk_sealed, tmk_kcv)"
            " VALUES ($1, $2, $3, $4, $5)",
            terminal_id, merchant_id, status, vault.seal(tmk, f"tmk:{terminal_id}"),
            crypto.check_value(tmk).hex().upper(),
        )
    except asyncpg.UniqueViolationError:
        raise AdminError(f"terminal {terminal_id} exists") from None
    except asyncpg.ForeignKeyViolationError:
        raise AdminError(f"no merchant {merchant_id}") from None


async def add_terminal(con: asyncpg.Connection, vault: Vault, terminal_id: str, merchant_id: str,
                       status: str = "active", tmk_hex: str | None = None) -> dict[str, Any]:
    """Register a terminal with a master key (generated, or imported from hex). The
    result carries the key in clear: the one time it is shown."""
    if not re.fullmatch(r"[\x21-\x7e]{1,8}", terminal_id):
        raise AdminError("a terminal id is 1 to 8 printable characters (field 41)")
    if status not in ("active", "disabled"):
        raise AdminError("terminal status is active or disabled")
    tmk = _tmk(tmk_hex)
    async with con.transaction():
        await _insert_terminal(con, vault, terminal_id, merchant_id, status, tmk)
        await audit.record(con, "terminal.add", terminal_id, {
            "merchant_id": merchant_id, "status": status, "tmk_imported": tmk_hex is not None,
            "tmk_check_value": crypto.check_value(tmk).hex().upper()})
    return _with_key((await list_terminals(con, terminal_id=terminal_id))[0], tmk)


async def rekey_terminal(con: asyncpg.Connection, vault: Vault, terminal_id: str,
                         tmk_hex: str | None = None) -> dict[str, Any]:
    """Replace a terminal's master key. Its working keys die with the old one: it
    must be loaded with the new key and sign on again."""
    tmk = _tmk(tmk_hex)
    kcv = crypto.check_value(tmk).hex().upper()
    async with con.transaction():
        done = await con.execute(
            "UPDATE terminals SET tmk_sealed = $2, tmk_kcv = $3, session_state = 'none',"
            " pik_sealed = NULL, mak_sealed = NULL, tdk_sealed = NULL WHERE terminal_id = $1",
            terminal_id, vault.seal(tmk, f"tmk:{terminal_id}"), kcv,
        )
        if done.endswith(" 0"):
            raise AdminError(f"no terminal {terminal_id}")
        await audit.record(con, "terminal.rekey", terminal_id,
                           {"tmk_imported": tmk_hex is not None, "tmk_check_value": kcv})
    return _with_key((await list_terminals(con, terminal_id=terminal_id))[0], tmk)


async def set_terminal_status(con: asyncpg.Connection, terminal_id: str, status: str) -> dict[str, Any]:
    if status not in ("active", "disabled"):
        raise AdminError("terminal status is active or disabled")
    async with con.transaction():
        done = await con.execute("UPDATE terminals SET status = $2 WHERE terminal_id = $1", terminal_id, status)
        if done.endswith(" 0"):
            raise AdminError(f"no terminal {terminal_id}")
        await audit.record(con, "terminal.disable" if status == "disabled" else "terminal.enable", terminal_id)
    return (await list_terminals(con, terminal_id=terminal_id))[0]


async def list_terminals(con: asyncpg.Connection, *, merchant_id: str | None = None,
                         terminal_id: str | None = None) -> list[dict[str, Any]]:
    rows = await con.fetch(
        "SELECT terminal_id, merchant_id, status, current_batch, signed_on_at, signed_off_at,"
        " session_state, key_scheme, tmk_kcv FROM terminals WHERE ($1::text IS NULL OR merchant_id = $1)"
        " AND ($2::text IS NULL OR terminal_id = $2) ORDER BY terminal_id",
        merchant_id, terminal_id,
    )
    return [
        {
            "terminal_id": r["terminal_id"],
            "merchant_id": r["merchant_id"],
            "status": r["status"],
            "current_batch": r["current_batch"],
            "signed_on_at": r["signed_on_at"].isoformat() if r["signed_on_at"] else None,
            "signed_off_at": r["signed_off_at"].isoformat() if r["signed_off_at"] else None,
            "session": r["session_state"],
            "tmk_check_value": r["tmk_kcv"],
        }
        for r in rows
    ]


# -- load-test data ------------------------------------------------------------------
async def seed(con: asyncpg.Connection, vault: Vault, *, merchant_id: str, earn_rate: Any, terminal_ids: list[str],
               first_card: int, cards: int, pin: str, tmk_hex: str | None = None) -> dict[str, Any]:
    """A merchant, terminals and cards for load tests; creates only what does not
    exist. Existing terminals keep their keys and existing cards their PINs. All
    terminals created share one master key (returned, the one time it is shown)
    and all cards created one PIN: load-test data only. One audit entry."""
    pin_hash = hash_pin(pin)
    async with con.transaction():
        merchant_exists = await con.fetchval("SELECT 1 FROM merchants WHERE merchant_id = $1", merchant_id)
        if not merchant_exists:
            rate, price, value = _rates(earn_rate, 1, 1)
            await _insert_merchant(con, merchant_id, "Load Test Merchant", rate, price, value)
        existing = {r["terminal_id"] for r in await con.fetch(
            "SELECT terminal_id FROM terminals WHERE terminal_id = ANY($1::text[])", terminal_ids)}
        new_ids = [t for t in terminal_ids if t not in existing]
        tmk = _tmk(tmk_hex) if new_ids else None
        for tid in new_ids:
            assert tmk is not None
            await _insert_terminal(con, vault, tid, merchant_id, "active", tmk)
        cards_created, cards_skipped = await add_cards_in_bulk(con, vault, first_card, cards, pin_hash)
        result: dict[str, Any] = {
            "merchant_id": merchant_id, "merchant_created": not merchant_exists,
            "terminals_created": len(new_ids), "terminals_skipped": len(existing),
            "cards_created": cards_created, "cards_skipped": cards_skipped,
            "first_card": mask_card(str(first_card)),
        }
        await audit.record(con, "seed", merchant_id, {
            **result, "tmk_check_value": crypto.check_value(tmk).hex().upper() if tmk else None})
    if tmk is not None:
        result = _with_key(result, tmk)
    return result


async def check_invariants(con: asyncpg.Connection) -> list[str]:
    """The ledger invariants of ARCHITECTURE.md; returns what is violated (empty = all hold)."""
    problems: list[str] = []
    total = await con.fetchval("SELECT coalesce(sum(balance_points), 0) FROM account_balances")
    if total != 0:
        problems.append(f"sum over all accounts is {total}, not 0")
    rows = await con.fetch(
        "SELECT c.pan_display, c.points_balance, b.balance_points FROM cards c"
        " JOIN account_balances b ON b.account_id = c.account_id"
        " WHERE c.points_balance <> b.balance_points LIMIT 10"
    )
    problems += [
        f"card {r['pan_display']}: balance {r['points_balance']} but journal says {r['balance_points']}"
        for r in rows
    ]
    negative = await con.fetchval("SELECT count(*) FROM cards WHERE points_balance < 0")
    if negative:
        problems.append(f"{negative} cards have a negative balance")
    orphans = await con.fetchval(
        "SELECT count(*) FROM postings p JOIN requests r USING (request_id)"
        " WHERE r.state <> 'approved' AND p.reason NOT IN ('hold', 'release')"
    )
    if orphans:
        problems.append(f"{orphans} postings belong to requests that were not approved")
    # Two-phase requests: points on hold are exactly those of pending requests, and
    # every declined request gave back what it held.
    held = await con.fetchval(
        "SELECT coalesce(sum(balance_points), 0) FROM account_balances WHERE kind = 'operator' AND owner = 'holds'")
    pending = await con.fetchval("SELECT coalesce(sum(points), 0) FROM requests WHERE state = 'pending'")
    if held != pending:
        problems.append(f"{held} points on hold but pending requests hold {pending}")
    unreleased = await con.fetchval(
        "SELECT count(*) FROM requests r WHERE r.state = 'declined'"
        " AND EXISTS (SELECT 1 FROM postings p WHERE p.request_id = r.request_id AND p.reason = 'hold')"
        " AND NOT EXISTS (SELECT 1 FROM postings p WHERE p.request_id = r.request_id AND p.reason = 'release')"
    )
    if unreleased:
        problems.append(f"{unreleased} declined requests still hold points")
    unposted = await con.fetchval(
        "SELECT count(*) FROM requests r WHERE r.state = 'approved' AND r.points > 0"
        " AND r.operation <> 'inquiry'"
        " AND NOT EXISTS (SELECT 1 FROM postings p WHERE p.request_id = r.request_id AND p.reason <> 'reversal')"
    )
    if unposted:
        problems.append(f"{unposted} approved requests that moved points have no posting")
    return problems


async def connectors(con: asyncpg.Connection) -> list[dict[str, Any]]:
    """What each connector of the running switch last reported: links, requests in
    flight, last echo, reversals owed."""
    rows = await con.fetch("SELECT name, state, updated_at FROM connector_status ORDER BY name")
    return [{"name": r["name"], "state": json.loads(r["state"]),
             "updated_at": r["updated_at"].isoformat(timespec="seconds")} for r in rows]


async def upstream_reversals(con: asyncpg.Connection) -> list[dict[str, Any]]:
    """Every reversal owed (or once owed) to an upstream host, oldest first."""
    rows = await con.fetch("SELECT reversal_id, connector, reason, state, attempts, created_at, acknowledged_at"
                           " FROM upstream_reversals ORDER BY reversal_id")
    return [dict(r) for r in rows]
