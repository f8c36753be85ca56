"""ISO 8583 response codes (field 39) and the ledger statuses they answer."""

from __future__ import annotations

from ..ledger.model import Status

APPROVED = "00"
INVALID_MERCHANT = "03"
REQUEST_IN_PROGRESS = "09"
NOT_HONOURED = "05"
INVALID_TRANSACTION = "12"
INVALID_AMOUNT = "13"
INVALID_CARD = "14"
ORIGINAL_NOT_ELIGIBLE = "22"
ORIGINAL_NOT_FOUND = "25"
FORMAT_ERROR = "30"
FUNCTION_NOT_SUPPORTED = "40"
INSUFFICIENT_POINTS = "51"
WRONG_PIN = "55"
PIN_TRIES_EXCEEDED = "75"
EXCEEDS_LIMIT = "61"
EXCEEDS_FREQUENCY = "65"
UPSTREAM_UNAVAILABLE = "91"
UPSTREAM_TIMEOUT = "98"
NOT_ALLOWED_AT_TERMINAL = "58"
RESTRICTED_CARD = "62"
AMOUNT_DIFFERS = "64"
BATCH_MISMATCH = "77"
DUPLICATE = "94"
SYSTEM_MALFUNCTION = "96"
TERMINAL_NOT_REGISTERED = "97"
MAC_ERROR = "A0"

FOR_STATUS: dict[Status, str] = {
    Status.APPROVED: APPROVED,
    Status.UNKNOWN_TERMINAL: TERMINAL_NOT_REGISTERED,
    Status.TERMINAL_DISABLED: NOT_ALLOWED_AT_TERMINAL,
    Status.WRONG_MERCHANT: INVALID_MERCHANT,
    Status.UNKNOWN_CARD: INVALID_CARD,
    Status.BLOCKED_CARD: RESTRICTED_CARD,
    Status.INVALID_AMOUNT: INVALID_AMOUNT,
    Status.INSUFFICIENT_POINTS: INSUFFICIENT_POINTS,
    Status.ORIGINAL_NOT_FOUND: ORIGINAL_NOT_FOUND,
    Status.ORIGINAL_NOT_ELIGIBLE: ORIGINAL_NOT_ELIGIBLE,
    Status.EXCEEDS_ORIGINAL: AMOUNT_DIFFERS,
    Status.DUPLICATE_KEY: DUPLICATE,
    # The late original of a transaction already reversed: not eligible any more.
    Status.ALREADY_REVERSED: ORIGINAL_NOT_ELIGIBLE,
    Status.NOT_SIGNED_ON: MAC_ERROR,
    Status.NO_MASTER_KEY: NOT_ALLOWED_AT_TERMINAL,
    Status.WRONG_PIN: WRONG_PIN,
    Status.PIN_LOCKED: PIN_TRIES_EXCEEDED,
    Status.LIMIT_EXCEEDED: EXCEEDS_LIMIT,
    Status.WRONG_LISTENER: NOT_ALLOWED_AT_TERMINAL,
    Status.TOO_FREQUENT: EXCEEDS_FREQUENCY,
    Status.BATCH_MISMATCH: BATCH_MISMATCH,
    # Authentication failed (no MAC, and not from where the terminal authenticated).
    Status.UNVERIFIED_PEER: MAC_ERROR,
    Status.PENDING: REQUEST_IN_PROGRESS,
    Status.UPSTREAM_DECLINED: NOT_HONOURED,
    Status.UPSTREAM_UNAVAILABLE: UPSTREAM_UNAVAILABLE,
    Status.UPSTREAM_TIMEOUT: UPSTREAM_TIMEOUT,
}

# An upstream host's decline passed on to the terminal as it is, where the code
# means the same to the terminal; any other decline becomes 05.
UPSTREAM_PASS_THROUGH = {"05", "13", "14", "54", "57", "61", "62", "65"}

# Codes whose response asks a cup terminal to sign on again (header processing requirement 3):
# a 77 sign-on gives the terminal its open batch (60.2 of the 0810).
SIGN_ON_AGAIN = {MAC_ERROR, BATCH_MISMATCH}

assert set(FOR_STATUS) == set(Status), "every ledger status has a response code"
