"""Operator functions over the ledger: merchants, terminals, load-test data, invariants.

Cards are in :mod:`.cards` (re-exported here). Used by ``pointswitch admin``;
they work while the switch runs (plain transactions on the same database).
Every function that changes something records one audit entry in the same
transaction as the change.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import asyncpg

from ..codecs import crypto
from . import audit, days
from .carddata import mask_card
from .cards import (
    add_card,
    add_cards_in_bulk,
    card_view,
    set_card_status,
    set_card_status_at,
    set_pin,
    show_card,
    unlock_pin,
    unlock_pin_at,
)
from .errors import AdminError
from .merchants import add_merchant, get_merchant, insert_merchant, list_merchants, merchant_rates, update_merchant
from .model import TerminalProfile
from .pins import pin_verifier
from .vault import Vault

__all__ = [
    "AdminError", "add_card", "add_cards_in_bulk", "add_merchant", "add_terminal", "card_view", "check_invariants",
    "checked_profile", "connectors", "get_merchant", "pin_verifier", "list_merchants", "list_terminals", "mask_card",
    "rekey_terminal", "seed", "set_card_status", "set_pin", "set_terminal_profile", "set_terminal_status",
    "set_card_status_at", "show_card", "unlock_pin", "unlock_pin_at", "update_merchant", "upstream_reversals",
]


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
                           status: str, tmk: bytes, profile: TerminalProfile) -> None:
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


async def add_terminal(con: asyncpg.Connection, vault: Vault, terminal_id: str, merchant_id: str,
                       status: str = "active", tmk_hex: str | None = None,
                       profile: TerminalProfile | None = None) -> dict[str, Any]:
    """Register a terminal with a master key (generated, or imported from hex) and the
    profile that says how it speaks and authenticates (default: cup, ECB MAC). The
    result carries the key in clear: the one time it is shown."""
    if not re.fullmatch(r"[\x21-\x7e]{1,8}", terminal_id):
        raise AdminError("a terminal id is 1 to 8 printable characters (field 41)")
    if status not in ("active", "disabled"):
        raise AdminError("terminal status is active or disabled")
    profile = checked_profile(profile or TerminalProfile())
    tmk = _tmk(tmk_hex)
    async with con.transaction():
        await _insert_terminal(con, vault, terminal_id, merchant_id, status, tmk, profile)
        await audit.record(con, "terminal.add", terminal_id, {
            "merchant_id": merchant_id, "status": status, "tmk_imported": tmk_hex is not None,
            "tmk_check_value": crypto.check_value(tmk).hex().upper(), "dialect": profile.dialect,
            "mac": profile.mac_method})
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
        await con.execute("DELETE FROM terminal_pending_keys WHERE terminal_id = $1", terminal_id)
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


# -- load-test data ------------------------------------------------------------------
async def seed(con: asyncpg.Connection, vault: Vault, *, merchant_id: str, earn_rate: Any, terminal_ids: list[str],
               first_card: int, cards: int, pin: str, tmk_hex: str | None = None) -> dict[str, Any]:
    """A merchant, terminals and cards for load tests; creates only what does not
    exist. Existing terminals keep their keys and existing cards their PINs. All
    terminals created share one master key (returned, the one time it is shown)
    and all cards created one PIN: load-test data only. One audit entry."""
    if not re.fullmatch(r"[0-9]{4,12}", pin):
        raise AdminError("a PIN is 4 to 12 digits")
    async with con.transaction():
        merchant_exists = await con.fetchval("SELECT 1 FROM merchants WHERE merchant_id = $1", merchant_id)
        if not merchant_exists:
            rate, price, value = merchant_rates(earn_rate, 1, 1)
            await insert_merchant(con, merchant_id, "Load Test Merchant", rate, price, value)
        existing = {r["terminal_id"] for r in await con.fetch(
            "SELECT terminal_id FROM terminals WHERE terminal_id = ANY($1::text[])", terminal_ids)}
        new_ids = [t for t in terminal_ids if t not in existing]
        tmk = _tmk(tmk_hex) if new_ids else None
        for tid in new_ids:
            assert tmk is not None
            await _insert_terminal(con, vault, tid, merchant_id, "active", tmk, checked_profile(TerminalProfile()))
        cards_created, cards_skipped = await add_cards_in_bulk(con, vault, first_card, cards, pin)
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


# What the journal refers to (decision 51: checked here, not by a foreign key per row).
_ORPHANS = {
    "postings naming no account": "SELECT count(*) FROM postings p WHERE NOT EXISTS"
    " (SELECT 1 FROM accounts a WHERE a.account_id = p.debit_account_id) OR NOT EXISTS"
    " (SELECT 1 FROM accounts a WHERE a.account_id = p.credit_account_id)",
    "postings of no request": "SELECT count(*) FROM postings p WHERE NOT EXISTS"
    " (SELECT 1 FROM requests r WHERE r.request_id = p.request_id)",
    "lots of no card or request": "SELECT count(*) FROM point_lots l WHERE NOT EXISTS"
    " (SELECT 1 FROM cards c WHERE c.card_index = l.card_index) OR (l.request_id IS NOT NULL AND NOT EXISTS"
    " (SELECT 1 FROM requests r WHERE r.request_id = l.request_id))",
    "lot draws of no lot or request": "SELECT count(*) FROM lot_draws d WHERE NOT EXISTS"
    " (SELECT 1 FROM point_lots l WHERE l.lot_id = d.lot_id) OR NOT EXISTS"
    " (SELECT 1 FROM requests r WHERE r.request_id = d.request_id)",
}


async def _orphans(con: asyncpg.Connection) -> list[str]:
    found = [(what, await con.fetchval(sql)) for what, sql in _ORPHANS.items()]
    return [f"{n} {what}" for what, n in found if n]


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
    # Lots (migration 0011): a card's balance is the sum of what is left of its lots.
    lots = await con.fetch(
        "SELECT c.pan_display, c.points_balance, coalesce(l.left_points, 0) AS left_points FROM cards c"
        " LEFT JOIN (SELECT card_index, sum(points_left) AS left_points FROM point_lots GROUP BY 1) l"
        " USING (card_index) WHERE c.points_balance <> coalesce(l.left_points, 0) LIMIT 10"
    )
    problems += [f"card {r['pan_display']}: balance {r['points_balance']} but its lots hold {r['left_points']}"
                 for r in lots]
    overdrawn = await con.fetchval(
        "SELECT count(*) FROM point_lots l WHERE l.points_left + coalesce((SELECT sum(d.points) FROM lot_draws d"
        " WHERE d.lot_id = l.lot_id AND NOT d.returned), 0) <> l.points_earned"
    )
    if overdrawn:
        problems.append(f"{overdrawn} lots whose points left and draws do not add up to what they earned")
    problems += await _orphans(con)
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
    undated = await con.fetchval("SELECT count(*) FROM postings WHERE business_date IS NULL")
    if undated:
        problems.append(f"{undated} postings have no business date")
    problems += await days.verify_days(con)
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
        await audit.record(con, "terminal.profile", terminal_id, {
            "dialect": profile.dialect, "mac": profile.mac_method, "double_mak": profile.double_mak,
            "single_des_allowed": profile.single_des_allowed})
    return (await list_terminals(con, terminal_id=terminal_id))[0]
