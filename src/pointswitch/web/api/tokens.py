"""Members' bearer tokens: the card index and an expiry, signed (HMAC-SHA256).

A token carries the card index only (never the card number) and is good until
it expires; it reads that card and no other. The signing key is a random secret
sealed in the database (``ledger.members.MemberCards.secret``), shared by every
process and surviving restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    MAX_TOKEN_CHARS = 512

    def __init__(self, key: bytes, ttl_s: float):
        self._key = key
        self.ttl_s = ttl_s

    def issue(self, card_index: str, now: float | None = None) -> tuple[str, int]:
        """A token for the card, and when it expires (Unix seconds)."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        payload = _b64(json.dumps({"card_index": card_index, "exp": expires}, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}", expires

    def card_index(self, token: str, now: float | None = None) -> str | None:
        """The card a valid, unexpired token is for; None otherwise."""
        if len(token) > self.MAX_TOKEN_CHARS or token.count(".") != 1:
            return None
        payload, mac = token.split(".")
        if not hmac.compare_digest(self._mac(payload), mac):
            return None
        try:
            claims = json.loads(_unb64(payload))
        except ValueError:
            return None
        if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int):
            return None
        if claims["exp"] <= (time.time() if now is None else now):
            return None
        card_index = claims.get("card_index")
        return card_index if isinstance(card_index, str) else None

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, b"member-token:" + payload.encode(), hashlib.sha256).digest())
