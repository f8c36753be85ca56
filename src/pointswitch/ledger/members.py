"""Members reading their own card (the JSON API's member side, ``web.api.member``):
one-time login codes, and the card's balance, points by expiry and history, all
by the card index (a member's token carries only that).

A login code is kept as a keyed hash (``Vault.fingerprint``) with its expiry and
its wrong tries; too many wrong codes in a row lock the card's logins for a while.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg

from .contacts import address_context
from .lots import card_expiries
from .vault import Vault

CODE_DIGITS = 6


class CodeCheck(StrEnum):
    ACCEPTED = "accepted"
    WRONG = "wrong"  # wrong, expired or none issued
    LOCKED = "locked"  # too many wrong codes: no login until the lockout ends


class CodeIssue(StrEnum):
    ISSUED = "issued"
    UNKNOWN_CARD = "unknown_card"
    TOO_SOON = "too_soon"  # the last code was sent less than resend_s ago
    LOCKED = "locked"


@dataclass(frozen=True)
class CodeRules:
    ttl_s: float = 300.0  # a code is valid this long
    resend_s: float = 60.0  # at most one code per card this often
    tries: int = 5  # wrong tries of one code before it is void
    max_failures: int = 10  # wrong codes in a row (any codes) before the card's logins are locked
    lockout_s: float = 900.0  # ... for this long


_ISSUE = """
INSERT INTO member_codes (card_index, code_hash, expires_at, tries, sent_at)
VALUES ($1, $2, now() + make_interval(secs => $3), 0, now())
ON CONFLICT (card_index) DO UPDATE SET code_hash = $2, expires_at = now() + make_interval(secs => $3), tries = 0,
    sent_at = now()
WHERE member_codes.sent_at IS NULL OR member_codes.sent_at <= now() - make_interval(secs => $4)
RETURNING 1
"""


class MemberCards:
    def __init__(self, pool: asyncpg.Pool, vault: Vault, rules: CodeRules | None = None, *,
                 acquire_timeout_s: float = 10.0):
        self._pool = pool
        self._vault = vault
        self.rules = rules or CodeRules()
        self._acquire_timeout_s = acquire_timeout_s

    def card_index(self, card_number: str) -> str:
        return self._vault.card_index(card_number)

    def _code_hash(self, card_index: str, code: str) -> bytes:
        return self._vault.fingerprint(f"member-code:{card_index}:{code}".encode())

    def _acquire(self) -> Any:
        return self._pool.acquire(timeout=self._acquire_timeout_s)

    async def issue_code(self, card_index: str) -> tuple[CodeIssue, str]:
        """A fresh code for the card (returned in clear, to be sent, never stored so)."""
        code = f"{secrets.randbelow(10 ** CODE_DIGITS):0{CODE_DIGITS}d}"
        async with self._acquire() as con, con.transaction():
            if not await con.fetchval("SELECT 1 FROM cards WHERE card_index = $1", card_index):
                return CodeIssue.UNKNOWN_CARD, ""
            locked = await con.fetchval("SELECT locked_until > now() FROM member_codes WHERE card_index = $1",
                                        card_index)
            if locked:
                return CodeIssue.LOCKED, ""
            issued = await con.fetchval(_ISSUE, card_index, self._code_hash(card_index, code),
                                        self.rules.ttl_s, self.rules.resend_s)
        return (CodeIssue.ISSUED, code) if issued else (CodeIssue.TOO_SOON, "")

    async def check_code(self, card_index: str, code: str) -> CodeCheck:
        """Accept the card's code once; count a wrong one (a code is void after its tries,
        the card's logins locked after max_failures wrong codes in a row)."""
        rules = self.rules
        async with self._acquire() as con, con.transaction():
            row = await con.fetchrow(
                "SELECT code_hash, expires_at > now() AS fresh, tries, failures, locked_until > now() AS locked"
                " FROM member_codes WHERE card_index = $1 FOR UPDATE", card_index)
            if row is None:
                return CodeCheck.WRONG
            if row["locked"]:
                return CodeCheck.LOCKED
            if row["code_hash"] is not None and row["fresh"] and hmac.compare_digest(
                    bytes(row["code_hash"]), self._code_hash(card_index, code)):
                await con.execute("UPDATE member_codes SET code_hash = NULL, expires_at = NULL, tries = 0,"
                                  " failures = 0 WHERE card_index = $1", card_index)
                return CodeCheck.ACCEPTED
            tries, failures = row["tries"] + 1, row["failures"] + 1
            void = tries >= rules.tries or not row["fresh"]
            locked = failures >= rules.max_failures
            await con.execute(
                "UPDATE member_codes SET tries = $2, failures = $3,"
                " code_hash = CASE WHEN $4 THEN NULL ELSE code_hash END,"
                " locked_until = CASE WHEN $5 THEN now() + make_interval(secs => $6) ELSE locked_until END"
                " WHERE card_index = $1",
                card_index, tries, 0 if locked else failures, void or locked, locked, rules.lockout_s)
        return CodeCheck.LOCKED if locked else CodeCheck.WRONG

    # -- the card, as its member sees it ------------------------------------------
    async def balance(self, card_index: str) -> dict[str, Any] | None:
        async with self._acquire() as con:
            row = await con.fetchrow("SELECT pan_display, status, points_balance FROM cards WHERE card_index = $1",
                                     card_index)
        if row is None:
            return None
        return {"card": row["pan_display"], "status": row["status"], "points_balance": row["points_balance"]}

    async def expiries(self, card_index: str) -> dict[str, Any]:
        async with self._acquire() as con:
            return await card_expiries(con, card_index)

    async def history(self, card_index: str, limit: int) -> list[dict[str, Any]]:
        """The card's last postings, newest first (points signed: + to the card, - from it)."""
        async with self._acquire() as con:
            rows = await con.fetch(
                "SELECT p.posting_id, p.reason, p.amount_points, p.created_at, p.debit_account_id = c.account_id"
                " AS debit, r.operation, r.merchant_id, r.rrn, r.business_date"
                " FROM cards c JOIN postings p ON p.debit_account_id = c.account_id OR p.credit_account_id"
                " = c.account_id JOIN requests r USING (request_id) WHERE c.card_index = $1"
                " ORDER BY p.posting_id DESC LIMIT $2", card_index, limit)
        return [{"at": r["created_at"].isoformat(), "operation": r["operation"], "reason": r["reason"],
                 "points": -r["amount_points"] if r["debit"] else r["amount_points"],
                 "merchant_id": r["merchant_id"], "rrn": r["rrn"],
                 "business_date": r["business_date"].isoformat() if r["business_date"] else None} for r in rows]

    async def sms_contact(self, card_index: str) -> tuple[str, str] | None:
        """The member's phone number (unsealed, memory only) and language, if registered."""
        async with self._acquire() as con:
            row = await con.fetchrow("SELECT address_sealed, language FROM contacts WHERE recipient_kind = 'member'"
                                     " AND recipient_ref = $1 AND channel = 'sms'", card_index)
        if row is None:
            return None
        phone = self._vault.open(row["address_sealed"], address_context("member", card_index, "sms")).decode()
        return phone, row["language"]

    # -- the web layer's own secrets ------------------------------------------------
    async def secret(self, name: str, size: int = 32) -> bytes:
        """A random secret of the web layer (e.g. the token signing key), sealed in the
        database, created on first use; the same in every process."""
        async with self._acquire() as con:
            await con.execute("INSERT INTO api_secrets (name, sealed) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                              name, self._vault.seal(secrets.token_bytes(size), f"api-secret:{name}"))
            sealed = await con.fetchval("SELECT sealed FROM api_secrets WHERE name = $1", name)
        return self._vault.open(sealed, f"api-secret:{name}")

    # -- the default delivery of codes (web.api.login_codes.StoredCodes) ----------------
    async def store_delivery(self, card_index: str, code: str) -> None:
        async with self._acquire() as con:
            await con.execute("DELETE FROM member_code_deliveries WHERE created_at < now() - make_interval(secs => $1)",
                              self.rules.ttl_s)
            await con.execute("INSERT INTO member_code_deliveries (card_index, code_sealed) VALUES ($1, $2)",
                              card_index, self._vault.seal(code.encode(), f"member-code:{card_index}"))


async def delivered_code(con: asyncpg.Connection, vault: Vault, card_index: str) -> str | None:
    """The last code handed to the default delivery for a card (tests, the demo)."""
    sealed = await con.fetchval("SELECT code_sealed FROM member_code_deliveries WHERE card_index = $1"
                                " ORDER BY delivery_id DESC LIMIT 1", card_index)
    return vault.open(sealed, f"member-code:{card_index}").decode() if sealed is not None else None
