"""Operator functions over the ledger: merchants, terminals, cards, invariants.

Used by ``pointswitch admin``; they work while the switch runs (plain
transactions on the same database).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg

from ..codecs import crypto
from .model import TerminalProfile
from .pins import hash_pin
from .vault import Vault


class AdminError(ValueError):
    """A refusal an operator can act on (unknown id, bad value, duplicate)."""


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


async def add_merchant(con: asyncpg.Connection, merchant_id: str, name: str, earn_rate: Any,
                       issue_price: Any = 1, redeem_value: Any = 1) -> dict[str, Any]:
    if not re.fullmatch(r"[\x21-\x7e]{1,15}", merchant_id):
        raise AdminError("a merchant id is 1 to 15 printable characters (field 42)")
    rate = _decimal(earn_rate, "earn rate")
    price = _decimal(issue_price, "issue price")
    value = _decimal(redeem_value, "redemption value")
    if value == 0:
        raise AdminError("redemption value per point must be above zero")
    async with con.transaction():
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
    return await get_merchant(con, merchant_id)


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


async def add_terminal(con: asyncpg.Connection, vault: Vault, terminal_id: str, merchant_id: str,
                       status: str = "active", tmk_hex: str | None = None,
                       profile: TerminalProfile | None = None) -> dict[str, Any]:
    """Register a terminal with a master key (generated, or imported from hex) and the
    profile that says how it speaks and authenticates (default: cup, ECB MAC)."""
    if not re.fullmatch(r"[\x21-\x7e]{1,8}", terminal_id):
        raise AdminError("a terminal id is 1 to 8 printable characters (field 41)")
    if status not in ("active", "disabled"):
        raise AdminError("terminal status is active or disabled")
    profile = checked_profile(profile or TerminalProfile())
    tmk = _tmk(tmk_hex)
    try:
        await con.execute(
            "INSERT INTO terminals (terminal_id, merchant_id, status, tmk_sealed, tmk_kcv, dialect, mac_method,"
            " double_mak, single_des_allowed) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            terminal_id, merchant_id, status, vault.seal(tmk, f"tmk:{terminal_id}"),
            crypto.check_value(tmk).hex().upper(), profile.dialect, profile.mac_method, profile.double_mak,
            profile.single_des_allowed,
        )
    except asyncpg.UniqueViolationError:
        raise AdminError(f"terminal {terminal_id} exists") from None
    except asyncpg.ForeignKeyViolationError:
        raise AdminError(f"no merchant {merchant_id}") from None
    return _with_key((await list_terminals(con, terminal_id=terminal_id))[0], tmk)


async def rekey_terminal(con: asyncpg.Connection, vault: Vault, terminal_id: str,
                         tmk_hex: str | None = None) -> dict[str, Any]:
    """Replace a terminal's master key. Its working keys die with the old one: it
    must be loaded with the new key and sign on again."""
    tmk = _tmk(tmk_hex)
    async with con.transaction():
        done = await con.execute(
            "UPDATE terminals SET tmk_sealed = $2, tmk_kcv = $3, session_state = 'none',"
            " pik_sealed = NULL, mak_sealed = NULL, tdk_sealed = NULL WHERE terminal_id = $1",
            terminal_id, vault.seal(tmk, f"tmk:{terminal_id}"), crypto.check_value(tmk).hex().upper(),
        )
        if done.endswith(" 0"):
            raise AdminError(f"no terminal {terminal_id}")
        await con.execute("DELETE FROM terminal_pending_keys WHERE terminal_id = $1", terminal_id)
    return _with_key((await list_terminals(con, terminal_id=terminal_id))[0], tmk)


async def set_terminal_status(con: asyncpg.Connection, terminal_id: str, status: str) -> dict[str, Any]:
    if status not in ("active", "disabled"):
        raise AdminError("terminal status is active or disabled")
    done = await con.execute("UPDATE terminals SET status = $2 WHERE terminal_id = $1", terminal_id, status)
    if done.endswith(" 0"):
        raise AdminError(f"no terminal {terminal_id}")
    return (await list_terminals(con, terminal_id=terminal_id))[0]


async def list_terminals(con: asyncpg.Connection, *, merchant_id: str | None = None,
                         terminal_id: str | None = None) -> list[dict[str, Any]]:
    rows = await con.fetch(
        "SELECT terminal_id, merchant_id, status, current_batch, signed_on_at, signed_off_at,"
        " session_state, key_scheme, tmk_kcv, dialect, mac_method, double_mak, single_des_allowed"
        " FROM terminals WHERE ($1::text IS NULL OR merchant_id = $1)"
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
            "dialect": r["dialect"],
            "mac": r["mac_method"],
            "double_mak": r["double_mak"],
            "single_des_allowed": r["single_des_allowed"],
        }
        for r in rows
    ]


def mask_card(card_number: str) -> str:
    """First 6 and last 4 digits, the rest masked: what logs and screens may show."""
    if len(card_number) <= 10:
        return "*" * len(card_number)
    return card_number[:6] + "*" * (len(card_number) - 10) + card_number[-4:]


async def add_card(con: asyncpg.Connection, card_number: str, holder_name: str, phone: str = "",
                   pin: str | None = None, status: str = "active") -> dict[str, Any]:
    if not re.fullmatch(r"[0-9]{12,19}", card_number):
        raise AdminError("a card number is 12 to 19 digits")
    if status not in ("active", "blocked"):
        raise AdminError("card status is active or blocked")
    pin_hash = hash_pin(pin) if pin else None
    async with con.transaction():
        account = await _account(con, "card", card_number)
        try:
            await con.execute(
                "INSERT INTO cards (card_number, holder_name, phone, pin_hash, status, account_id)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                card_number, holder_name, phone, pin_hash, status, account,
            )
        except asyncpg.UniqueViolationError:
            raise AdminError(f"card {mask_card(card_number)} exists") from None
    return await show_card(con, card_number, postings_limit=0)


async def set_card_status(con: asyncpg.Connection, card_number: str, status: str) -> dict[str, Any]:
    done = await con.execute(
        "UPDATE cards SET status = $2, updated_at = now() WHERE card_number = $1", card_number, status
    )
    if done.endswith(" 0"):
        raise AdminError(f"no card {mask_card(card_number)}")
    return await show_card(con, card_number, postings_limit=0)


async def set_pin(con: asyncpg.Connection, card_number: str, pin: str) -> dict[str, Any]:
    """Set a card's PIN (stored as a salted scrypt hash); clears failed tries and a PIN lock."""
    pin_hash = hash_pin(pin)
    done = await con.execute(
        "UPDATE cards SET pin_hash = $2, pin_failures = 0, pin_locked = false, updated_at = now()"
        " WHERE card_number = $1", card_number, pin_hash,
    )
    if done.endswith(" 0"):
        raise AdminError(f"no card {mask_card(card_number)}")
    return await show_card(con, card_number, postings_limit=0)


async def unlock_pin(con: asyncpg.Connection, card_number: str) -> dict[str, Any]:
    done = await con.execute(
        "UPDATE cards SET pin_failures = 0, pin_locked = false, updated_at = now() WHERE card_number = $1",
        card_number,
    )
    if done.endswith(" 0"):
        raise AdminError(f"no card {mask_card(card_number)}")
    return await show_card(con, card_number, postings_limit=0)


async def show_card(con: asyncpg.Connection, card_number: str, postings_limit: int = 50) -> dict[str, Any]:
    card = await con.fetchrow(
        "SELECT card_number, holder_name, phone, status, points_balance, account_id,"
        " pin_hash IS NOT NULL AS has_pin, pin_failures, pin_locked, created_at FROM cards WHERE card_number = $1",
        card_number,
    )
    if card is None:
        raise AdminError(f"no card {mask_card(card_number)}")
    postings = await con.fetch(
        "SELECT p.posting_id, p.reason, p.amount_points, p.created_at, p.debit_account_id,"
        " r.operation, r.terminal_id, r.merchant_id, r.rrn, r.trace, r.batch"
        " FROM postings p JOIN requests r USING (request_id)"
        " WHERE p.debit_account_id = $1 OR p.credit_account_id = $1"
        " ORDER BY p.posting_id DESC LIMIT $2",
        card["account_id"], postings_limit,
    )
    return {
        "card_number": card["card_number"],
        "holder_name": card["holder_name"],
        "phone": card["phone"],
        "status": card["status"],
        "has_pin": card["has_pin"],
        "pin_failures": card["pin_failures"],
        "pin_locked": card["pin_locked"],
        "points_balance": card["points_balance"],
        "postings": [
            {
                "posting_id": p["posting_id"],
                "at": p["created_at"].isoformat(),
                "reason": p["reason"],
                "operation": p["operation"],
                "points": -p["amount_points"] if p["debit_account_id"] == card["account_id"] else p["amount_points"],
                "merchant_id": p["merchant_id"],
                "terminal_id": p["terminal_id"],
                "batch": p["batch"],
                "trace": p["trace"],
                "rrn": p["rrn"],
            }
            for p in postings
        ],
    }


async def check_invariants(con: asyncpg.Connection) -> list[str]:
    """The ledger invariants of ARCHITECTURE.md; returns what is violated (empty = all hold)."""
    problems: list[str] = []
    total = await con.fetchval("SELECT coalesce(sum(balance_points), 0) FROM account_balances")
    if total != 0:
        problems.append(f"sum over all accounts is {total}, not 0")
    rows = await con.fetch(
        "SELECT c.card_number, c.points_balance, b.balance_points FROM cards c"
        " JOIN account_balances b ON b.account_id = c.account_id"
        " WHERE c.points_balance <> b.balance_points LIMIT 10"
    )
    problems += [
        f"card {mask_card(r['card_number'])}: balance {r['points_balance']} but journal says {r['balance_points']}"
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


async def add_cards_in_bulk(con: asyncpg.Connection, first: int, count: int, pin_hash: str) -> None:
    """Cards ``first`` .. ``first + count - 1`` with one PIN hash (load-test data), in one
    statement each: seeding 100k cards takes seconds. Existing ones get the PIN again."""
    async with con.transaction():
        await con.execute(
            "INSERT INTO accounts (kind, owner) SELECT 'card', ($1::bigint + g)::text"
            " FROM generate_series(0, $2 - 1) g ON CONFLICT DO NOTHING", first, count)
        await con.execute(
            "INSERT INTO cards (card_number, holder_name, account_id, points_balance, pin_hash)"
            " SELECT a.owner, 'Load ' || a.owner, a.account_id, 0, $3 FROM accounts a"
            " WHERE a.kind = 'card' AND a.owner ~ '^[0-9]+$'"
            " AND a.owner::numeric BETWEEN $1::bigint AND $1::bigint + $2 - 1"
            " ON CONFLICT (card_number) DO UPDATE SET pin_hash = EXCLUDED.pin_hash, pin_failures = 0,"
            " pin_locked = false", first, count, pin_hash)


async def upstream_reversals(con: asyncpg.Connection) -> list[dict[str, Any]]:
    """Every reversal owed (or once owed) to an upstream host, oldest first."""
    rows = await con.fetch("SELECT reversal_id, connector, reason, state, attempts, created_at, acknowledged_at"
                           " FROM upstream_reversals ORDER BY reversal_id")
    return [dict(r) for r in rows]


def checked_profile(profile: TerminalProfile) -> TerminalProfile:
    """A terminal profile as stored: X9.19 always uses a double-length MAK."""
    if profile.dialect not in ("cup", "iso87"):
        raise AdminError("a terminal's dialect is cup or iso87")
    if profile.mac_method not in ("ecb", "x919", "off"):
        raise AdminError("a terminal's MAC method is ecb, x919 or off")
    if profile.mac_method == "x919":
        profile = replace(profile, double_mak=True)
    return profile


async def set_terminal_profile(con: asyncpg.Connection, terminal_id: str, *, dialect: str | None = None,
                               mac: str | None = None, double_mak: bool | None = None,
                               single_des_allowed: bool | None = None) -> dict[str, Any]:
    """Change how a terminal speaks and authenticates. Its working keys are withdrawn
    (they were issued for the old profile): it signs on again."""
    row = await con.fetchrow("SELECT dialect, mac_method, double_mak, single_des_allowed FROM terminals"
                             " WHERE terminal_id = $1", terminal_id)
    if row is None:
        raise AdminError(f"no terminal {terminal_id}")
    profile = checked_profile(TerminalProfile(
        dialect or row["dialect"], mac or row["mac_method"],
        row["double_mak"] if double_mak is None else double_mak,
        row["single_des_allowed"] if single_des_allowed is None else single_des_allowed,
    ))
    async with con.transaction():
        await con.execute(
            "UPDATE terminals SET dialect = $2, mac_method = $3, double_mak = $4, single_des_allowed = $5,"
            " session_state = 'none', pik_sealed = NULL, mak_sealed = NULL, tdk_sealed = NULL"
            " WHERE terminal_id = $1",
            terminal_id, profile.dialect, profile.mac_method, profile.double_mak, profile.single_des_allowed,
        )
        await con.execute("DELETE FROM terminal_pending_keys WHERE terminal_id = $1", terminal_id)
    return (await list_terminals(con, terminal_id=terminal_id))[0]
