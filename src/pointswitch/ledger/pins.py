"""Members' PINs: how they are stored and checked, and the lockout after wrong tries.

A PIN is stored as a *PIN verification value*, the way issuers' HSMs keep them:
HMAC-SHA256 under the PIN verification key (``pvk``, a data key sealed in the
vault) of the card number and the PIN, stored as ``pvv1$<hex>``. Checking one
takes microseconds, and a copy of the database without the master key gives
nothing to search. Hashes of earlier versions (``scrypt$...``) still verify, in a
bounded thread pool, and are replaced by a verification value at the card's next
right PIN.

A verification value is checked inside the request's own transaction
(``check_locked``): the card row is locked, its failures read, the PIN verified
(microseconds) and a wrong try counted, all before the request is decided and
in the same commit. The row lock serialises every try on the card, so parallel
guesses cannot get more tries than ``max_pin_tries``, whatever their
interleaving, and a right PIN costs no write at all.

A hash of an earlier version is checked outside any transaction (``check``),
holding no connection while scrypt computes. Each such try is reserved before
the PIN is verified, in one UPDATE that only succeeds while the card's failures
plus its tries in progress are below ``max_pin_tries``. A try whose process died
before it ended counts as a wrong one once it is older than ``check_time_limit_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import structlog

from .model import Status

log = structlog.get_logger("pointswitch.ledger")

PVV_SCHEME = "pvv1"


class PinFormatError(ValueError):
    """Not a PIN: 4 to 12 digits."""


def pin_verifier(pvk: bytes, card_number: str, pin: str) -> str:
    """The stored form of a card's PIN: ``pvv1$`` + HMAC-SHA256(pvk, card number, PIN)."""
    if not re.fullmatch(r"[0-9]{4,12}", pin):
        raise PinFormatError("a PIN is 4 to 12 digits")
    digest = hmac.new(pvk, f"{PVV_SCHEME}:{card_number}:{pin}".encode(), hashlib.sha256).hexdigest()
    return f"{PVV_SCHEME}${digest}"


def verify_scrypt(pin: str, stored: str) -> bool:
    """A hash of an earlier version: ``scrypt$N$r$p$salt$hash`` (slow on purpose)."""
    _, n, r, p, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(pin.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate.hex(), digest)


# A card's PIN try, reserved: it counts against the limit from now until it ends.
# Tries reserved longer ago than $3 seconds never ended (their process died): they
# are counted as wrong ones here.
_RESERVE = """
UPDATE cards SET
    pin_failures = pin_failures + CASE WHEN pin_check_at < now() - make_interval(secs => $3)
                                       THEN pin_checks_pending ELSE 0 END,
    pin_checks_pending = CASE WHEN pin_check_at < now() - make_interval(secs => $3)
                              THEN 0 ELSE pin_checks_pending END + 1,
    pin_check_at = now()
WHERE card_index = $1 AND status = 'active' AND NOT pin_locked AND pin_hash IS NOT NULL
  AND pin_failures + pin_checks_pending < $2
RETURNING pin_hash
"""

_RIGHT = """
UPDATE cards SET pin_checks_pending = greatest(pin_checks_pending - 1, 0), pin_failures = 0,
                 pin_hash = coalesce($2, pin_hash)
WHERE card_index = $1
"""

_WRONG = """
UPDATE cards SET pin_checks_pending = greatest(pin_checks_pending - 1, 0), pin_failures = pin_failures + 1,
                 pin_locked = pin_locked OR pin_failures + 1 >= $2
WHERE card_index = $1
RETURNING pin_locked, pin_failures
"""


class LegacyPin(Exception):
    """The card's PIN is stored as a hash of an earlier version: ``check`` it outside
    the transaction (which is rolled back), then run the request again."""


# The card row, locked: every PIN try on the card waits here for the one before it.
# Tries reserved by ``check`` (hashes of earlier versions) and not yet ended count as
# in progress until they are older than $2 seconds.
_LOCK = """
SELECT status, pin_hash, pin_locked, pin_failures,
       CASE WHEN pin_check_at >= now() - make_interval(secs => $2) THEN pin_checks_pending ELSE 0 END AS in_progress
FROM cards WHERE card_index = $1
FOR UPDATE
"""

_WRONG_LOCKED = """
UPDATE cards SET pin_failures = pin_failures + 1, pin_locked = pin_locked OR pin_failures + 1 >= $2
WHERE card_index = $1
RETURNING pin_locked, pin_failures
"""


class PinCheck:
    def __init__(self, pool: asyncpg.Pool, pvk: bytes, max_pin_tries: int, pin_workers: int, *,
                 check_time_limit_s: float = 30.0, busy_wait_s: float = 2.0):
        self._pool = pool
        self._pvk = pvk
        self.max_pin_tries = max_pin_tries
        self.check_time_limit_s = check_time_limit_s
        self.busy_wait_s = busy_wait_s  # waiting for the card's other PIN checks to end
        # Only hashes of earlier versions need it: scrypt off the event loop, bounded.
        self._legacy_pool = ThreadPoolExecutor(max_workers=max(1, pin_workers), thread_name_prefix="pin")

    def close(self) -> None:
        self._legacy_pool.shutdown(wait=False, cancel_futures=True)

    async def check_locked(self, con: asyncpg.Connection, card_number: str, card_index: str, pin: str | None
                           ) -> Status | None:
        """As ``check``, inside the request's transaction on ``con``: None when the PIN
        is right or the card's own state decides the answer. A wrong try is counted in
        the transaction, so it commits with the request's decline. Raises LegacyPin when
        the card's PIN is a hash of an earlier version."""
        row = await con.fetchrow(_LOCK, card_index, self.check_time_limit_s)
        if row is None or row["status"] != "active":
            return None  # the operation answers unknown (14) or blocked (62)
        if row["pin_locked"] or row["pin_failures"] >= self.max_pin_tries:
            return Status.PIN_LOCKED
        stored = row["pin_hash"]
        if pin is None or stored is None:
            return Status.WRONG_PIN  # no PIN block, or no PIN set: not counted as a try
        if not stored.startswith(PVV_SCHEME + "$"):
            raise LegacyPin
        if row["pin_failures"] + row["in_progress"] >= self.max_pin_tries:
            return Status.TOO_FREQUENT  # old-form tries of this card still running: they may use up the limit
        if re.fullmatch(r"[0-9]{4,12}", pin) and hmac.compare_digest(pin_verifier(self._pvk, card_number, pin), stored):
            if row["pin_failures"]:
                await con.execute("UPDATE cards SET pin_failures = 0 WHERE card_index = $1", card_index)
            return None
        wrong = await con.fetchrow(_WRONG_LOCKED, card_index, self.max_pin_tries)
        log.info("wrong PIN", tries=wrong["pin_failures"], locked=wrong["pin_locked"])
        return Status.PIN_LOCKED if wrong["pin_locked"] else Status.WRONG_PIN

    async def check(self, card_number: str, card_index: str, pin: str | None) -> Status | None:
        """None when the PIN is right, or when the card's own state decides the answer
        (unknown or blocked card: the operation declines it). A wrong PIN counts a try;
        the try that reaches the limit locks the card for PIN use until an operator
        unlocks it. No PIN block, or no PIN set, is WRONG_PIN and not counted."""
        stored = await self._reserve(card_index, pin)
        if stored is None or isinstance(stored, Status):  # (Status is a str too: test it first)
            return stored
        right, upgrade = await self._verify(card_number, pin or "", stored)
        async with self._pool.acquire() as con:
            if right:
                await con.execute(_RIGHT, card_index, upgrade)
                return None
            row = await con.fetchrow(_WRONG, card_index, self.max_pin_tries)
        log.info("wrong PIN", tries=row["pin_failures"] if row else None, locked=row["pin_locked"] if row else None)
        return Status.PIN_LOCKED if row and row["pin_locked"] else Status.WRONG_PIN

    async def _reserve(self, card_index: str, pin: str | None) -> str | Status | None:
        """The stored PIN value once a try is reserved; else the answer to give."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.busy_wait_s
        while True:
            async with self._pool.acquire() as con:
                if pin is not None:
                    stored = await con.fetchval(_RESERVE, card_index, self.max_pin_tries, self.check_time_limit_s)
                    if stored is not None:
                        return str(stored)
                row = await con.fetchrow(
                    "SELECT status, pin_locked, pin_failures, pin_checks_pending, pin_hash IS NOT NULL AS has_pin"
                    " FROM cards WHERE card_index = $1", card_index,
                )
            if row is None or row["status"] != "active":
                return None  # the operation answers unknown (14) or blocked (62)
            if row["pin_locked"] or row["pin_failures"] >= self.max_pin_tries:
                return Status.PIN_LOCKED
            if pin is None or not row["has_pin"]:
                return Status.WRONG_PIN  # no PIN block, or no PIN set: not counted as a try
            # Tries of this card are in progress up to the limit: wait for them to end.
            if loop.time() >= until:
                log.warning("PIN check waited too long for the card's other PIN checks")
                return Status.TOO_FREQUENT
            await asyncio.sleep(0.005)

    async def _verify(self, card_number: str, pin: str, stored: str) -> tuple[bool, str | None]:
        """(right, the verification value to store instead when ``stored`` is an old hash)."""
        if stored.startswith(PVV_SCHEME + "$"):
            if not re.fullmatch(r"[0-9]{4,12}", pin):
                return False, None
            return hmac.compare_digest(pin_verifier(self._pvk, card_number, pin), stored), None
        if stored.startswith("scrypt$"):
            loop = asyncio.get_running_loop()
            right = await loop.run_in_executor(self._legacy_pool, verify_scrypt, pin, stored)
            return right, (pin_verifier(self._pvk, card_number, pin) if right else None)
        log.error("PIN stored in an unknown form", scheme=stored.split("$", 1)[0])
        return False, None
