"""Card data at rest: how a card number, holder name and phone are stored.

The database never holds them in clear. A card row is keyed by its *card
index*, HMAC-SHA256 of the card number under the vault's ``card_index`` data
key (the ledger computes it from the number a terminal or an operator gives);
the number, holder name and phone are sealed under the master key with
associated data naming the card index (``pan:<index>``, ``holder:<index>``,
``phone:<index>``), so a sealed value copied to another card does not open;
``pan_display`` (first 6 and last 4 digits) is what screens show.

Also here: the conversion of a database written by a version that stored them
in clear (the Python step of migration 0005).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from . import audit
from .vault import Vault

log = structlog.get_logger("pointswitch.ledger")

_PAGE = 10_000  # rows converted per round trip


def mask_card(card_number: str) -> str:
    """First 6 and last 4 digits, the rest masked: what logs and screens may show."""
    if len(card_number) <= 10:
        return "*" * len(card_number)
    return card_number[:6] + "*" * (len(card_number) - 10) + card_number[-4:]


def mask_name(name: str) -> str:
    """The first character and a fixed mask (the length is not shown)."""
    return name[:1] + "***" if name else ""


def mask_phone(phone: str | None) -> str:
    """The last 4 digits behind a fixed mask."""
    if not phone:
        return ""
    return "***" + phone[-4:] if len(phone) > 4 else "*" * len(phone)


@dataclass(frozen=True)
class SealedCard:
    """What the ``cards`` row stores of a card's identity."""

    card_index: str
    pan_sealed: bytes
    holder_sealed: bytes
    phone_sealed: bytes | None
    pan_display: str


def seal_card(vault: Vault, card_number: str, holder_name: str, phone: str | None) -> SealedCard:
    index = vault.card_index(card_number)
    return SealedCard(
        card_index=index,
        pan_sealed=vault.seal(card_number.encode(), f"pan:{index}"),
        holder_sealed=vault.seal(holder_name.encode(), f"holder:{index}"),
        phone_sealed=vault.seal(phone.encode(), f"phone:{index}") if phone else None,
        pan_display=mask_card(card_number),
    )


def unseal_card(vault: Vault, row: asyncpg.Record | dict[str, Any]) -> dict[str, str]:
    """Card number, holder name and phone in clear, from a row with the sealed columns."""
    index = row["card_index"]
    phone = row["phone_sealed"]
    return {
        "card_number": vault.open(row["pan_sealed"], f"pan:{index}").decode(),
        "holder_name": vault.open(row["holder_sealed"], f"holder:{index}").decode(),
        "phone": vault.open(phone, f"phone:{index}").decode() if phone is not None else "",
    }


# -- conversion of a database with clear card data (migration 0005) ----------------
async def convert_clear_card_data(con: asyncpg.Connection, vault: Vault) -> None:
    """Fill the columns migration 0005 added, from the clear ones it keeps until 0006.

    Runs inside migration 0005's transaction, so the conversion is all or
    nothing. Every clear card number anywhere (cards, the request log, card
    accounts' owners) gets its card index; cards get their sealed number,
    holder and phone; stored request fingerprints are keyed. On a new database
    there is nothing to convert."""
    indexed = await _index_card_numbers(con, vault)
    cards = await _seal_cards(con, vault)
    fingerprints = await _key_fingerprints(con, vault)
    if indexed or fingerprints:
        await audit.record(con, "migrate.card_data", "database",
                           {"cards": cards, "card_numbers": indexed, "fingerprints": fingerprints})
        log.warning("clear card data converted: card numbers indexed, card data sealed, fingerprints keyed",
                    cards=cards, card_numbers=indexed, fingerprints=fingerprints)


async def _index_card_numbers(con: asyncpg.Connection, vault: Vault) -> int:
    await con.execute("CREATE TEMP TABLE pan_index (pan text PRIMARY KEY, card_index text) ON COMMIT DROP")
    await con.execute(
        "INSERT INTO pan_index (pan) SELECT card_number FROM cards"
        " UNION SELECT card_number FROM requests WHERE card_number IS NOT NULL"
        " UNION SELECT owner FROM accounts WHERE kind = 'card'"
    )
    last, total = "", 0
    while True:
        pans = [r["pan"] for r in await con.fetch(
            "SELECT pan FROM pan_index WHERE pan > $1 ORDER BY pan LIMIT $2", last, _PAGE)]
        if not pans:
            break
        await con.execute(
            "UPDATE pan_index p SET card_index = u.card_index"
            " FROM unnest($1::text[], $2::text[]) AS u(pan, card_index) WHERE p.pan = u.pan",
            pans, [vault.card_index(pan) for pan in pans],
        )
        last, total = pans[-1], total + len(pans)
    await con.execute("UPDATE requests r SET card_index = p.card_index FROM pan_index p WHERE r.card_number = p.pan")
    await con.execute(
        "UPDATE accounts a SET owner = p.card_index FROM pan_index p WHERE a.kind = 'card' AND a.owner = p.pan")
    return total


async def _seal_cards(con: asyncpg.Connection, vault: Vault) -> int:
    last, total = "", 0
    while True:
        rows = await con.fetch(
            "SELECT card_number, holder_name, phone FROM cards WHERE card_number > $1 ORDER BY card_number LIMIT $2",
            last, _PAGE,
        )
        if not rows:
            break
        sealed = [seal_card(vault, r["card_number"], r["holder_name"], r["phone"]) for r in rows]
        await con.execute(
            "UPDATE cards c SET card_index = u.card_index, pan_sealed = u.pan_sealed,"
            " holder_sealed = u.holder_sealed, phone_sealed = u.phone_sealed, pan_display = u.pan_display"
            " FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::bytea[], $6::text[])"
            " AS u(card_number, card_index, pan_sealed, holder_sealed, phone_sealed, pan_display)"
            " WHERE c.card_number = u.card_number",
            [r["card_number"] for r in rows], [s.card_index for s in sealed], [s.pan_sealed for s in sealed],
            [s.holder_sealed for s in sealed], [s.phone_sealed for s in sealed], [s.pan_display for s in sealed],
        )
        last, total = rows[-1]["card_number"], total + len(rows)
    return total


async def _key_fingerprints(con: asyncpg.Connection, vault: Vault) -> int:
    """A stored fingerprint was SHA-256 of the request's content; the keyed one is
    HMAC of that same digest (see ``Posting.content_digest``), so keying the stored
    value in place keeps retransmissions of old requests recognised."""
    last, total = 0, 0
    while True:
        rows = await con.fetch(
            "SELECT request_id, fingerprint FROM requests WHERE request_id > $1 AND fingerprint IS NOT NULL"
            " ORDER BY request_id LIMIT $2", last, _PAGE,
        )
        if not rows:
            break
        await con.execute(
            "UPDATE requests r SET fingerprint = u.fingerprint"
            " FROM unnest($1::bigint[], $2::bytea[]) AS u(request_id, fingerprint) WHERE r.request_id = u.request_id",
            [r["request_id"] for r in rows], [vault.fingerprint(bytes(r["fingerprint"])) for r in rows],
        )
        last, total = rows[-1]["request_id"], total + len(rows)
    return total
