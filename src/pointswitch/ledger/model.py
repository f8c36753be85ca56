"""The ledger's vocabulary: commands in, outcomes out. No ISO field numbers here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal
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
    NOT_SIGNED_ON = "not_signed_on"
    NO_MASTER_KEY = "no_master_key"
    WRONG_PIN = "wrong_pin"
    PIN_LOCKED = "pin_locked"
    LIMIT_EXCEEDED = "limit_exceeded"
    WRONG_LISTENER = "wrong_listener"  # the terminal's profile names another dialect or MAC method
    TOO_FREQUENT = "too_frequent"  # e.g. sign-ons past their rate limit
    # The request names a batch that is not the terminal's open one (it was settled,
    # or never opened): nothing is posted, the terminal signs on to learn its batch.
    BATCH_MISMATCH = "batch_mismatch"
    # A settlement or batch upload without a MAC from an address the terminal has not
    # authenticated from (see routing.settlement): refused, nothing changed.
    UNVERIFIED_PEER = "unverified_peer"
    # Points leaving through an upstream host.
    PENDING = "pending"  # held, the upstream leg is under way
    UPSTREAM_DECLINED = "upstream_declined"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"


class KeyScheme(StrEnum):
    """Working keys a sign-on issues: single-length, double-length, or double-length
    plus a track data key."""

    SINGLE = "single"
    DOUBLE = "double"
    DOUBLE_WITH_TRACK = "double_with_track"


class Operation(StrEnum):
    """A financial operation on a card's points, asked by a terminal or (``EXPIRE``)
    made by the expiry run. The values are stored (``requests.operation``) and logged:
    they never change."""

    INQUIRY = "inquiry"  # a balance inquiry: routed and logged, posts nothing
    ACCRUE = "accrue"
    REDEEM = "redeem"
    VOID_ACCRUAL = "void_accrual"
    VOID_REDEMPTION = "void_redemption"
    REFUND = "refund"
    CASH_OUT = "cash_out"  # points converted into money credited to a bank card
    INSURANCE = "insurance"  # points paying an insurance premium
    EXPIRE = "expire"  # a card's lots past their expiry date, moved to the operator's expired account


# Operations whose value leaves the network through an upstream host: two-phase.
UPSTREAM_OPERATIONS = {Operation.CASH_OUT, Operation.INSURANCE}


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
class UsageRule:
    """Rate, fee and limits of one kind of points usage outside the network."""

    points_per_yuan: Decimal
    fee_points: int = 0
    min_amount_fen: int = 1
    daily_limit_fen: int = 0


@dataclass(frozen=True)
class ExpiryRule:
    """When an accrual's points expire (``decide.expiry_date``): "never"; "months" after
    the business date they were earned on; or "end_of_year", Dec 31 of the earning
    year + ``years``."""

    policy: str = "never"
    months: int = 24
    years: int = 1


@dataclass(frozen=True)
class GroupCommit:
    """How accruals are written together (``ledger.group``): ``writers`` batches at
    once (0: one transaction per request), at most ``max_batch`` requests each,
    at most ``queue_size`` waiting."""

    writers: int = 3
    max_batch: int = 64
    queue_size: int = 1024


@dataclass(frozen=True)
class UpstreamLeg:
    """Where a two-phase request goes, and what to send if it must be reversed.

    ``reversal`` is opaque to the ledger (the switch's serialised message); the
    ledger only keeps it sealed and hands it to the store-and-forward queue."""

    connector: str
    reference: str  # retrieval reference sent upstream
    reversal: bytes = field(repr=False)
    deadline_s: float = 30.0  # pending longer than this: timed out by the sweeper


@dataclass(frozen=True)
class Command:
    terminal_id: str
    merchant_id: str


@dataclass(frozen=True)
class SignOn(Command):
    """Issue fresh working keys. They are pending (the keys in use stay valid) until
    the terminal's first message that verifies under them, unless ``activate``
    (terminals whose profile has no MAC: nothing could ever verify them)."""

    scheme: KeyScheme = KeyScheme.DOUBLE
    peer: str = ""  # the address the sign-on came from: pending keys are kept per peer
    activate: bool = False


@dataclass(frozen=True)
class PromoteKeys(Command):
    """A message verified under pending keys: they become the keys in use."""

    generation: int = 0


@dataclass(frozen=True)
class DropSession(Command):
    """Withdraw the terminal's working keys, in use and pending (authenticated
    sign-off, or too many MAC failures): it must sign on again."""

    reason: str = ""


@dataclass(frozen=True)
class GetSession(Command):
    """The terminal's current working keys, if it is signed on."""


@dataclass(frozen=True)
class WrappedKey:
    """A working key encrypted under the terminal master key, and its check value."""

    under_tmk: bytes
    check_value: bytes


@dataclass(frozen=True)
class KeyExchange:
    scheme: KeyScheme
    pik: WrappedKey
    mak: WrappedKey
    tdk: WrappedKey | None = None


@dataclass(frozen=True)
class Session:
    """A signed-on terminal's clear working keys: in memory only, never logged."""

    scheme: KeyScheme
    generation: int
    pik: bytes = field(repr=False)
    mak: bytes = field(repr=False)
    tdk: bytes | None = field(default=None, repr=False)
    pending: bool = False  # issued by a sign-on, not yet used by the terminal


@dataclass(frozen=True)
class TerminalProfile:
    """How a terminal speaks and authenticates: it transacts only on a listener
    with the same dialect and MAC method."""

    dialect: str = "cup"  # cup | iso87
    mac_method: str = "ecb"  # ecb | x919 | off
    double_mak: bool = False
    single_des_allowed: bool = False


@dataclass(frozen=True)
class TerminalAuth:
    """What the switch needs to authenticate a terminal's message, kept in memory:
    status, profile, the keys in use and the pending ones (newest first)."""

    terminal_id: str
    merchant_id: str
    terminal_active: bool
    merchant_active: bool
    profile: TerminalProfile
    current: Session | None = None
    pending: tuple[Session, ...] = ()

    def sessions(self) -> tuple[Session, ...]:
        """Every key set a message may verify under: the one in use first."""
        return ((self.current,) if self.current else ()) + self.pending


@dataclass(frozen=True)
class Inquire(Command):
    card_number: str
    pin_required: bool = False
    pin: str | None = field(default=None, repr=False, compare=False)  # clear PIN, memory only


@dataclass(frozen=True)
class Posting(Command):
    """A command that moves points and is logged under its idempotency key."""

    key: RequestKey
    card_number: str
    amount_fen: int
    operation: Operation
    original: OriginalRef | None = None
    pin_required: bool = False
    # The PIN check's answer, decided before the posting's transaction (None: right, or not asked).
    pin_refusal: Status | None = field(default=None, compare=False)
    # The clear PIN, decrypted from the PIN block; memory only, and not part of the
    # fingerprint (a stored hash of a 6-digit PIN would be guessable).
    pin: str | None = field(default=None, repr=False, compare=False)
    counterparty: str = field(default="", repr=False)  # bank card number or policy number (upstream operations)
    upstream: UpstreamLeg | None = field(default=None, compare=False)

    def content_digest(self) -> bytes:
        """SHA-256 of what must be equal for a retransmission to be the same request.

        Memory only: it covers the clear card number, which is guessable, so the
        request log stores it keyed (``Vault.fingerprint`` of this digest)."""
        content: dict[str, Any] = {
            "op": self.operation.value,
            "merchant": self.merchant_id,
            "card": self.card_number,
            "amount": self.amount_fen,
            "original": asdict(self.original) if self.original else None,
        }
        if self.counterparty:
            content["counterparty"] = self.counterparty
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).digest()


@dataclass(frozen=True)
class Reverse(Command):
    """Undo the transaction logged under ``key``, exactly once."""

    key: RequestKey
    card_number: str
    amount_fen: int
    operation: Operation


@dataclass(frozen=True)
class CompleteUpstream(Command):
    """The upstream leg of the request under ``key`` ended: post or release its hold.

    result: "approved", "declined" (the host said no), "unavailable" (never sent),
    "timeout" or "lost" (sent, no answer: the hold is released and the stored
    reversal is queued in the same transaction)."""

    key: RequestKey
    result: str
    upstream_rc: str = ""
    upstream_reference: str = ""


@dataclass(frozen=True)
class BatchTotals:
    """What a batch adds up to (the settlement rule, docs/integrator.md): debits are
    approved accruals, redemptions, cash-outs and premiums, gross; credits are approved
    voids and refunds; reversed ones and everything else are left out. Amounts in fen."""

    debit_amount_fen: int = 0
    debit_count: int = 0
    credit_amount_fen: int = 0
    credit_count: int = 0


@dataclass(frozen=True)
class SettleBatch(Command):
    """Close the terminal's open batch ``batch``, comparing its totals to the host's.

    ``trace`` identifies the settlement message: the same trace for the batch just
    closed is a retransmission, answered as before."""

    batch: int
    trace: int
    totals: BatchTotals


@dataclass(frozen=True)
class UploadRecord:
    """One transaction of a settled batch, as the terminal reports it."""

    trace: int
    card_number: str = field(repr=False)  # clear: the ledger keeps only its index and a masked form
    amount_fen: int
    card_organisation: str = "00"


@dataclass(frozen=True)
class UploadBatch(Command):
    """Records of the batch just settled (``batch``), sent in a message with ``trace``."""

    batch: int
    trace: int
    records: tuple[UploadRecord, ...]


@dataclass(frozen=True)
class EndUpload(Command):
    """The terminal has sent ``records_sent`` records: reconcile them with the host's log."""

    batch: int
    trace: int
    records_sent: int
    terminal_agreed: bool  # 207: the settlement agreed; 202: it did not


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
    business_date: str = ""  # ISO date of the business day the request was posted on
    replayed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    key_exchange: KeyExchange | None = field(default=None, repr=False)
    session: Session | None = field(default=None, repr=False)

    @property
    def approved(self) -> bool:
        return self.status is Status.APPROVED

    def to_json(self) -> str:
        transient = ("replayed", "key_exchange", "session")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in transient}
        d["status"] = self.status.value
        return json.dumps(d)

    @classmethod
    def from_json(cls, raw: str | dict[str, Any], *, replayed: bool = True) -> Outcome:
        d = json.loads(raw) if isinstance(raw, str) else dict(raw)
        d["status"] = Status(d["status"])
        return cls(**d, replayed=replayed)
