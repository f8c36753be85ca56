"""Members' PINs: how they are stored and checked, and the lockout after wrong tries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import structlog

from .model import Status

log = structlog.get_logger("pointswitch.ledger")

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class PinFormatError(ValueError):
    """Not a PIN: 4 to 12 digits."""


def hash_pin(pin: str) -> str:
    """Salted, slow, one-way: scrypt. Stored as ``scrypt$N$r$p$salt$hash`` (hex)."""
    if not re.fullmatch(r"[0-9]{4,12}", pin):
        raise PinFormatError("a PIN is 4 to 12 digits")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_pin(pin: str, stored: str) -> bool:
    _, n, r, p, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(pin.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate.hex(), digest)


class PinCheck:
    def __init__(self, max_pin_tries: int, pin_workers: int):
        self.max_pin_tries = max_pin_tries
        # scrypt is slow on purpose: off the event loop, in a bounded pool of its own.
        self._pin_pool = ThreadPoolExecutor(max_workers=max(1, pin_workers), thread_name_prefix="pin")

    def close(self) -> None:
        self._pin_pool.shutdown(wait=False, cancel_futures=True)

    async def check(self, con: asyncpg.Connection, ctx: asyncpg.Record, card: str, pin: str | None
                         ) -> Status | None:
        """None when the PIN is right. A wrong PIN counts a try; the try that reaches
        the limit locks the card for PIN use until an operator unlocks it."""
        if ctx["pin_locked"]:
            return Status.PIN_LOCKED
        if ctx["pin_hash"] is None or pin is None:
            return Status.WRONG_PIN  # no PIN set, or no PIN block: not counted as a try
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self._pin_pool, verify_pin, pin, ctx["pin_hash"]):
            await con.execute(
                "UPDATE cards SET pin_failures = 0 WHERE card_index = $1 AND pin_failures <> 0", card
            )
            return None
        locked = await con.fetchval(
            "UPDATE cards SET pin_failures = pin_failures + 1, pin_locked = pin_failures + 1 >= $2"
            " WHERE card_index = $1 RETURNING pin_locked",
            card, self.max_pin_tries,
        )
        log.info("wrong PIN", card=card, locked=locked)
        return Status.PIN_LOCKED if locked else Status.WRONG_PIN
