"""Who is told what, and how: members' and merchants' contacts (docs/messages.md).

A contact is one channel (sms, email, webhook) of one recipient: a member, named
by the card index, or a merchant. Its address and a webhook's signing secret are
sealed under the vault; screens, logs and the audit trail see a masked address.
Opting out keeps the contact (and its messages' history) and stops new messages
at once: the outbox triggers only queue for opted-in contacts, and a worker drops
a queued message whose contact opted out meanwhile.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg

from . import audit
from .carddata import mask_card, mask_phone
from .errors import AdminError
from .vault import Vault

CHANNELS = ("sms", "email", "webhook")
LANGUAGES = ("zh-CN", "en")
_PHONE = re.compile(r"\+?[0-9]{6,15}")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}")
_URL = re.compile(r"https?://[^\s/]{1,255}(/\S{0,1024})?")


def address_context(kind: str, ref: str, channel: str) -> str:
    """The seal context of a contact's address (the secret's: ``contact-secret:...``)."""
    return f"contact:{kind}:{ref}:{channel}"


def mask_address(channel: str, address: str) -> str:
    """What may be shown of an address: a phone's last 4 digits, an e-mail's first
    letter and domain, a URL's scheme and host."""
    if channel == "sms":
        return mask_phone(address)
    if channel == "email":
        local, _, domain = address.partition("@")
        return f"{local[:1]}***@{domain}"
    scheme, _, rest = address.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/..."


def check_address(channel: str, address: str) -> None:
    pattern = {"sms": _PHONE, "email": _EMAIL, "webhook": _URL}[channel]
    if not pattern.fullmatch(address):
        what = {"sms": "a phone number (digits, + allowed)", "email": "an e-mail address",
                "webhook": "an http(s) URL"}[channel]
        raise AdminError(f"{channel} needs {what}")


def _row(r: asyncpg.Record) -> dict[str, Any]:
    return {"contact_id": r["contact_id"], "channel": r["channel"], "address": r["address_display"],
            "opt_in": r["opt_in"], "language": r["language"],
            "updated_at": r["updated_at"].isoformat(timespec="seconds")}


async def _merchant_exists(con: asyncpg.Connection, merchant_id: str) -> None:
    if await con.fetchval("SELECT 1 FROM merchants WHERE merchant_id = $1", merchant_id) is None:
        raise AdminError(f"no merchant {merchant_id}")


async def _card(con: asyncpg.Connection, vault: Vault, card_number: str) -> tuple[str, str]:
    """(card index, masked number) of an existing card."""
    index = vault.card_index(card_number)
    if await con.fetchval("SELECT 1 FROM cards WHERE card_index = $1", index) is None:
        raise AdminError(f"no card {mask_card(card_number)}")
    return index, mask_card(card_number)


async def _upsert(con: asyncpg.Connection, vault: Vault, kind: str, ref: str, target: str, channel: str,
                  address: str, secret: str | None, language: str) -> dict[str, Any]:
    if channel not in CHANNELS:
        raise AdminError(f"a channel is one of {', '.join(CHANNELS)}")
    if language not in LANGUAGES:
        raise AdminError(f"a language is one of {', '.join(LANGUAGES)}")
    check_address(channel, address)
    if (channel == "webhook") != (secret is not None):
        raise AdminError("a webhook needs a signing secret (--secret -), and only a webhook has one")
    if secret is not None and len(secret) < 16:
        raise AdminError("a webhook's signing secret is at least 16 characters")
    context = address_context(kind, ref, channel)
    sealed_secret = vault.seal(secret.encode(), f"contact-secret:{context}") if secret is not None else None
    display = mask_address(channel, address)
    async with con.transaction():
        row = await con.fetchrow(
            "INSERT INTO contacts (recipient_kind, recipient_ref, channel, address_sealed, address_display,"
            " secret_sealed, language) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (recipient_kind, recipient_ref, channel) DO UPDATE SET"
            " address_sealed = EXCLUDED.address_sealed, address_display = EXCLUDED.address_display,"
            " secret_sealed = EXCLUDED.secret_sealed,"
            " language = EXCLUDED.language, opt_in = true, updated_at = now() RETURNING *",
            kind, ref, channel, vault.seal(address.encode(), context), display, sealed_secret, language)
        await audit.record(con, f"{'card' if kind == 'member' else 'merchant'}.contact_add", target,
                           {"channel": channel, "address": display, "language": language})
    return _row(row)


async def add_card_contact(con: asyncpg.Connection, vault: Vault, card_number: str, channel: str, address: str,
                           language: str = "zh-CN") -> dict[str, Any]:
    """Subscribe a member (by card number) on a channel; an existing contact of that
    channel is replaced and opted in again."""
    index, masked = await _card(con, vault, card_number)
    return await _upsert(con, vault, "member", index, masked, channel, address, None, language)


async def add_merchant_contact(con: asyncpg.Connection, vault: Vault, merchant_id: str, channel: str, address: str,
                               secret: str | None = None, language: str = "zh-CN") -> dict[str, Any]:
    await _merchant_exists(con, merchant_id)
    return await _upsert(con, vault, "merchant", merchant_id, merchant_id, channel, address, secret, language)


async def _set_opt_in(con: asyncpg.Connection, kind: str, ref: str, target: str, channel: str,
                      opt_in: bool) -> dict[str, Any]:
    async with con.transaction():
        row = await con.fetchrow(
            "UPDATE contacts SET opt_in = $4, updated_at = now()"
            " WHERE recipient_kind = $1 AND recipient_ref = $2 AND channel = $3 RETURNING *",
            kind, ref, channel, opt_in)
        if row is None:
            raise AdminError(f"{target} has no {channel} contact")
        action = f"{'card' if kind == 'member' else 'merchant'}.contact_{'opt_in' if opt_in else 'opt_out'}"
        await audit.record(con, action, target, {"channel": channel})
    return _row(row)


async def set_card_opt_in(con: asyncpg.Connection, vault: Vault, card_number: str, channel: str,
                          opt_in: bool) -> dict[str, Any]:
    index, masked = await _card(con, vault, card_number)
    return await _set_opt_in(con, "member", index, masked, channel, opt_in)


async def set_merchant_opt_in(con: asyncpg.Connection, merchant_id: str, channel: str, opt_in: bool) -> dict[str, Any]:
    await _merchant_exists(con, merchant_id)
    return await _set_opt_in(con, "merchant", merchant_id, merchant_id, channel, opt_in)


async def list_contacts(con: asyncpg.Connection, kind: str, ref: str) -> list[dict[str, Any]]:
    rows = await con.fetch("SELECT * FROM contacts WHERE recipient_kind = $1 AND recipient_ref = $2 ORDER BY channel",
                           kind, ref)
    return [_row(r) for r in rows]


async def card_contacts(con: asyncpg.Connection, vault: Vault, card_number: str) -> list[dict[str, Any]]:
    index, _masked = await _card(con, vault, card_number)
    return await list_contacts(con, "member", index)


async def merchant_contacts(con: asyncpg.Connection, merchant_id: str) -> list[dict[str, Any]]:
    await _merchant_exists(con, merchant_id)
    return await list_contacts(con, "merchant", merchant_id)
