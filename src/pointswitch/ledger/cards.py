"""Operator functions over membership cards: issue, block, PINs, show, bulk load-test cards.

An operator names a card by its number; the functions find it by its card
index. What they return shows the number masked, the holder's name and phone
masked, unless ``reveal`` is asked for, which is audited. Every change records
one audit entry in its own transaction.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg

from . import audit
from .carddata import SealedCard, mask_card, mask_name, mask_phone, seal_card, unseal_card
from .errors import AdminError
from .lots import card_expiries
from .pins import pin_verifier
from .vault import Vault

_BULK_CHUNK = 50_000  # load-test cards sealed and copied per round trip
LOAD_HOLDER = "Load test member"


def _check_number(card_number: str) -> None:
    if not re.fullmatch(r"[0-9]{12,19}", card_number):
        raise AdminError("a card number is 12 to 19 digits")


async def card_account(con: asyncpg.Connection, card_index: str) -> int:
    """The card's ledger account (owned by its card index), created if needed."""
    return int(await con.fetchval(
        "INSERT INTO accounts (kind, owner) VALUES ('card', $1)"
        " ON CONFLICT (kind, owner) DO UPDATE SET owner = EXCLUDED.owner RETURNING account_id",
        card_index,
    ))


async def add_card(con: asyncpg.Connection, vault: Vault, card_number: str, holder_name: str, phone: str = "",
                   pin: str | None = None, status: str = "active") -> dict[str, Any]:
    _check_number(card_number)
    if status not in ("active", "blocked"):
        raise AdminError("card status is active or blocked")
    sealed = seal_card(vault, card_number, holder_name, phone or None)
    pin_hash = pin_verifier(vault.data_key("pvk"), card_number, pin) if pin else None
    async with con.transaction():
        account = await card_account(con, sealed.card_index)
        try:
            await con.execute(
                "INSERT INTO cards (card_index, pan_sealed, holder_sealed, phone_sealed, pan_display, pin_hash,"
                " status, account_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                sealed.card_index, sealed.pan_sealed, sealed.holder_sealed, sealed.phone_sealed,
                sealed.pan_display, pin_hash, status, account,
            )
        except asyncpg.UniqueViolationError:
            raise AdminError(f"card {sealed.pan_display} exists") from None
        await audit.record(con, "card.add", sealed.pan_display,
                           {"card_index": sealed.card_index, "status": status, "pin_set": pin_hash is not None})
    return await show_card(con, vault, card_number, postings_limit=0)


async def _change(con: asyncpg.Connection, vault: Vault, card_number: str, action: str, sql: str,
                  *args: Any, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one UPDATE of the card ($1 = its card index) and its audit entry, together."""
    return await _change_at(con, vault, vault.card_index(card_number), action, sql, *args, details=details,
                            named=mask_card(card_number))


async def _change_at(con: asyncpg.Connection, vault: Vault, index: str, action: str, sql: str, *args: Any,
                     details: dict[str, Any] | None = None, named: str = "with that index") -> dict[str, Any]:
    async with con.transaction():
        display = await con.fetchval(sql + " RETURNING pan_display", index, *args)
        if display is None:
            raise AdminError(f"no card {named}")
        await audit.record(con, action, display, {"card_index": index, **(details or {})})
    return await card_view(con, vault, index, postings_limit=0)


async def set_card_status(con: asyncpg.Connection, vault: Vault, card_number: str, status: str) -> dict[str, Any]:
    return await set_card_status_at(con, vault, vault.card_index(card_number), status, named=mask_card(card_number))


async def set_card_status_at(con: asyncpg.Connection, vault: Vault, index: str, status: str, *,
                             named: str = "with that index") -> dict[str, Any]:
    """Block or unblock the card with card index ``index`` (the console names cards by it)."""
    if status not in ("active", "blocked"):
        raise AdminError("card status is active or blocked")
    return await _change_at(con, vault, index, "card.block" if status == "blocked" else "card.unblock",
                            "UPDATE cards SET status = $2, updated_at = now() WHERE card_index = $1", status,
                            named=named)


async def set_pin(con: asyncpg.Connection, vault: Vault, card_number: str, pin: str) -> dict[str, Any]:
    """Set a card's PIN (stored as a keyed verification value); clears failed tries and a PIN lock."""
    pin_hash = pin_verifier(vault.data_key("pvk"), card_number, pin)
    return await _change(con, vault, card_number, "card.set_pin",
                         "UPDATE cards SET pin_hash = $2, pin_failures = 0, pin_locked = false, updated_at = now()"
                         " WHERE card_index = $1", pin_hash)


async def unlock_pin(con: asyncpg.Connection, vault: Vault, card_number: str) -> dict[str, Any]:
    return await unlock_pin_at(con, vault, vault.card_index(card_number), named=mask_card(card_number))


async def unlock_pin_at(con: asyncpg.Connection, vault: Vault, index: str, *,
                        named: str = "with that index") -> dict[str, Any]:
    return await _change_at(con, vault, index, "card.unlock_pin",
                            "UPDATE cards SET pin_failures = 0, pin_locked = false, updated_at = now()"
                            " WHERE card_index = $1", named=named)


async def show_card(con: asyncpg.Connection, vault: Vault, card_number: str, postings_limit: int = 50, *,
                    reveal: bool = False) -> dict[str, Any]:
    """The card, its balance and its last postings. Number, holder and phone are
    masked; with ``reveal`` they are unsealed and shown, and the reveal is audited."""
    return await card_view(con, vault, vault.card_index(card_number), postings_limit, reveal=reveal,
                           named=mask_card(card_number))


async def card_view(con: asyncpg.Connection, vault: Vault, index: str, postings_limit: int = 50, *,
                    reveal: bool = False, named: str = "with that index") -> dict[str, Any]:
    """:func:`show_card` for the card with card index ``index``."""
    async with con.transaction():
        card = await con.fetchrow(
            "SELECT card_index, pan_sealed, holder_sealed, phone_sealed, pan_display, status, points_balance,"
            " account_id, pin_hash IS NOT NULL AS has_pin, pin_failures, pin_locked FROM cards WHERE card_index = $1",
            index,
        )
        if card is None:
            raise AdminError(f"no card {named}")
        if reveal:
            await audit.record(con, "card.reveal", card["pan_display"],
                               {"card_index": index, "fields": ["card_number", "holder_name", "phone"]})
    clear = unseal_card(vault, card)
    if reveal:
        identity = {**clear, "revealed": True}
    else:
        identity = {"card_number": card["pan_display"], "holder_name": mask_name(clear["holder_name"]),
                    "phone": mask_phone(clear["phone"]), "revealed": False}
    postings = await con.fetch(
        "SELECT p.posting_id, p.reason, p.amount_points, p.created_at, p.debit_account_id,"
        " r.operation, r.terminal_id, r.merchant_id, r.rrn, r.trace, r.batch"
        " FROM postings p JOIN requests r USING (request_id)"
        " WHERE p.debit_account_id = $1 OR p.credit_account_id = $1"
        " ORDER BY p.posting_id DESC LIMIT $2",
        card["account_id"], postings_limit,
    )
    return {
        **identity,
        "status": card["status"],
        "has_pin": card["has_pin"],
        "pin_failures": card["pin_failures"],
        "pin_locked": card["pin_locked"],
        "points_balance": card["points_balance"],
        "points_by_expiry": await card_expiries(con, index),
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


async def add_cards_in_bulk(con: asyncpg.Connection, vault: Vault, first: int, count: int, pin: str
                            ) -> tuple[int, int]:
    """Cards ``first`` .. ``first + count - 1``, all with one PIN (load-test data).
    Cards that exist are left as they are. Returns (created, skipped).

    Indexes and seals are computed here and copied in bulk: 100k cards take seconds."""
    numbers = [str(first + i) for i in range(count)]
    for number in (numbers[0], numbers[-1]) if numbers else ():
        _check_number(number)
    created = 0
    async with con.transaction():
        await con.execute(
            "CREATE TEMP TABLE seed_cards (card_index text, pan_sealed bytea, holder_sealed bytea,"
            " pan_display text, pin_hash text) ON COMMIT DROP")
        pvk = vault.data_key("pvk")
        for start in range(0, count, _BULK_CHUNK):
            chunk = numbers[start:start + _BULK_CHUNK]
            sealed: list[SealedCard] = [seal_card(vault, n, LOAD_HOLDER, None) for n in chunk]
            await con.execute("TRUNCATE seed_cards")
            await con.copy_records_to_table(
                "seed_cards", records=[(s.card_index, s.pan_sealed, s.holder_sealed, s.pan_display,
                                        pin_verifier(pvk, n, pin)) for s, n in zip(sealed, chunk, strict=True)])
            await con.execute(
                "INSERT INTO accounts (kind, owner) SELECT 'card', s.card_index FROM seed_cards s"
                " WHERE NOT EXISTS (SELECT 1 FROM cards c WHERE c.card_index = s.card_index)"
                " ON CONFLICT DO NOTHING")
            created += int(await con.fetchval(
                "WITH added AS (INSERT INTO cards (card_index, pan_sealed, holder_sealed, pan_display, account_id,"
                " pin_hash) SELECT s.card_index, s.pan_sealed, s.holder_sealed, s.pan_display, a.account_id,"
                " s.pin_hash FROM seed_cards s JOIN accounts a ON a.kind = 'card' AND a.owner = s.card_index"
                " ON CONFLICT (card_index) DO NOTHING RETURNING 1) SELECT count(*) FROM added"))
        await con.execute("DROP TABLE seed_cards")
    return created, count - created
