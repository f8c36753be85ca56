"""The ledger's vocabulary: commands in, outcomes out. No ISO field numbers here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """Why a command was approved or declined, in domain words.

    ``routing`` maps each to an ISO response code."""

    APPROVED = "approved"
    UNKNOWN_TERMINAL = "unknown_terminal"
    TERMINAL_DISABLED = "terminal_disabled"
    WRONG_MERCHANT = "wrong_merchant"
    UNKNOWN_CARD = "unknown_card"
    BLOCKED_CARD = "blocked_card"
    INVALID_AMOUNT = "invalid_amount"
    INSUFFICIENT_POINTS = "insufficient_points"
    ORIGINAL_NOT_FOUND = "original_not_found"
    ORIGINAL_NOT_ELIGIBLE = "original_not_eligible"
    EXCEEDS_ORIGINAL = "exceeds_original"
    DUPLICATE_KEY = "duplicate_key"
    ALREADY_REVERSED = "already_reversed"


class Operation(StrEnum):
    ACCRUE = "accrue"
    REDEEM = "redeem"
    VOID_ACCRUAL = "void_accrual"
    VOID_REDEMPTION = "void_redemption"
    REFUND = "refund"


@dataclass(frozen=True)
class RequestKey:
    """A terminal's natural idempotency key: terminal id + batch + trace."""

    terminal_id: str
    batch: int
    trace: int

    def __str__(self) -> str:
        return f"{self.terminal_id}:{self.batch:06d}:{self.trace:06d}"


@dataclass(frozen=True)
class OriginalRef:
    """Points at an earlier transaction of the same terminal."""

    batch: int
    trace: int
    rrn: str = ""


@dataclass(frozen=True)
class Command:
    terminal_id: str
    merchant_id: str


@dataclass(frozen=True)
class SignOn(Command):
    pass


@dataclass(frozen=True)
class SignOff(Command):
    pass


@dataclass(frozen=True)
class Inquire(Command):
    card_number: str


@dataclass(frozen=True)
class Posting(Command):
    """A command that moves points and is logged under its idempotency key."""

    key: RequestKey
    card_number: str
    amount_fen: int
    operation: Operation
    original: OriginalRef | None = None

    def fingerprint(self) -> bytes:
        """What must be equal for a retransmission to be the same request."""
        content = {
            "op": self.operation.value,
            "merchant": self.merchant_id,
            "card": self.card_number,
            "amount": self.amount_fen,
            "original": asdict(self.original) if self.original else None,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).digest()


@dataclass(frozen=True)
class Reverse(Command):
    """Undo the transaction logged under ``key``, exactly once."""

    key: RequestKey
    card_number: str
    amount_fen: int
    operation: Operation


@dataclass(frozen=True)
class Outcome:
    status: Status
    points_moved: int = 0
    points_balance: int | None = None
    cash_value_fen: int | None = None
    rrn: str = ""
    auth_code: str = ""
    batch: int | None = None
    host_time: str = ""  # ISO 8601, UTC; kept so that a replay is identical
    replayed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def approved(self) -> bool:
        return self.status is Status.APPROVED

    def to_json(self) -> str:
        d = asdict(self)
        d["status"] = self.status.value
        d.pop("replayed")
        return json.dumps(d)

    @classmethod
    def from_json(cls, raw: str | dict[str, Any], *, replayed: bool = True) -> Outcome:
        d = json.loads(raw) if isinstance(raw, str) else dict(raw)
        d["status"] = Status(d["status"])
        return cls(**d, replayed=replayed)
