"""What a terminal sends and gets back: the operations of PROTOCOL.md, replies, and
the ways a request can fail to be answered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..codecs.subfields import parse_54
from ..logs import mask_pan

FINANCIAL_MTIS = {"0200", "0220", "0400", "0420"}
PIN_OPS = {"inquiry", "redeem", "cash_out", "insurance"}

# 60.1 transaction types and processing codes of PROTOCOL.md
OPS: dict[str, tuple[str, str, str]] = {
    # name: (MTI, processing code, 60.1)
    "inquiry": ("0200", "310000", "01"),
    "accrue": ("0200", "000000", "22"),
    "void_accrual": ("0200", "200000", "23"),
    "refund": ("0220", "200000", "25"),
    "redeem": ("0200", "000000", "51"),
    "void_redemption": ("0200", "200000", "52"),
    "cash_out": ("0200", "400000", "53"),  # points to a UnionPay card: 48 = the bank card
    "insurance": ("0200", "500000", "54"),  # points for a premium: 48 = the policy number
}


@dataclass
class Reply:
    request: dict[str, str]
    fields: dict[str, str]
    latency_ms: float = 0.0
    envelope: Any = None
    mac_ok: bool | None = None  # None: the response carried no MAC

    @property
    def rc(self) -> str:
        return self.fields.get("39", "")

    @property
    def approved(self) -> bool:
        return self.rc == "00"

    @property
    def points_balance(self) -> int | None:
        for b in parse_54(self.fields.get("54", "")):
            if b.currency == "999":
                return b.amount
        return None

    @property
    def cash_value_fen(self) -> int | None:
        for b in parse_54(self.fields.get("54", "")):
            if b.currency == "156":
                return b.amount
        return None

    @property
    def points_moved(self) -> int | None:
        value = self.fields.get("63", "").strip()
        return int(value) if value.isdigit() else None

    @property
    def rrn(self) -> str:
        return self.fields.get("37", "")

    @property
    def trace(self) -> str:
        return self.request.get("11", "")


class TerminalError(RuntimeError):
    pass


class NoAnswer(TerminalError):
    """A request that left and was never answered: no response within the terminal's
    timeout, or the connection closed first. With reversal on timeout, ``reversal`` is
    the answer to the terminal's reversal (None: not reversed, or never answered) and
    ``reversal_attempts`` how many times it was sent."""

    def __init__(self, request: dict[str, str], why: str):
        super().__init__(why)
        self.request = request
        self.reversal: Reply | None = None
        self.reversal_attempts = 0




def describe(reply: Reply) -> dict[str, Any]:
    """A readable summary of a reply (card number masked)."""
    card = reply.request.get("2", "")
    return {
        "mti": reply.fields.get("t"),
        "rc": reply.rc,
        "trace": reply.fields.get("11"),
        "card": mask_card(card) if card else None,
        "amount_fen": int(reply.fields["4"]) if "4" in reply.fields else None,
        "points_moved": reply.points_moved,
        "points_balance": reply.points_balance,
        "cash_value_fen": reply.cash_value_fen,
        "rrn": reply.rrn or None,
        "auth_code": reply.fields.get("38"),
        "batch": reply.fields.get("60", "")[2:8] or None,
        "mac_verified": reply.mac_ok,
        "latency_ms": round(reply.latency_ms, 2),
    }


# 60.1 of the operations a terminal reverses when unanswered: every financial one
# but the balance inquiry (which moves nothing).
NOT_REVERSED = {"01"}


def operation_of(fields: dict[str, str]) -> str:
    """The name of a request's operation: a key of :data:`OPS` for financial messages
    (a reversal is named after what it reverses: its MTI tells them apart), else
    sign_on, sign_off, echo, or the MTI."""
    mti, txn_type, proc = fields.get("t", ""), fields.get("60", "")[:2], fields.get("3", "")[:2]
    for name, (_mti, op_proc, op_type) in OPS.items():
        if op_type == txn_type and op_proc[:2] == proc and (mti == _mti or mti in ("0400", "0420")):
            return name
    network = {"0800": "sign_on", "0820": "echo" if fields.get("60", "")[8:11] == "301" else "sign_off"}
    return network.get(mti, mti)


def reversible(fields: dict[str, str]) -> bool:
    """Whether a terminal reverses this request when it goes unanswered (0200 / 0220,
    not an inquiry)."""
    return fields.get("t") in ("0200", "0220") and fields.get("60", "")[:2] not in NOT_REVERSED


def reversal_of(original: dict[str, str], reason: str = "98") -> dict[str, str]:
    """The reversal (0400) of ``original``: a copy with 39 = reason, without the PIN
    block (52) and the original's MAC (64); it is MAC'd again when sent."""
    fields = {k: v for k, v in original.items() if k not in ("52", "64")}
    fields["t"] = "0400"
    fields["39"] = reason
    return fields


def mask_card(card: str) -> str:
    """First 6 and last 4 digits: the only form of a card number a simulator writes."""
    masked = mask_pan(card)
    if masked == card and len(card) > 10:  # not digits only: mask anyway
        masked = card[:6] + "*" * (len(card) - 10) + card[-4:]
    return masked
