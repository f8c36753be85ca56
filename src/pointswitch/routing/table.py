"""The routing table of PROTOCOL.md, as data.

Financial messages route on MTI + first two digits of field 3 + field 25 +
60.1; network management on MTI + 60.3 (or field 70 where 60.3 is absent).
A reversal (0400) routes to the operation it reverses by field 3 and 60.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..ledger import Operation


class Network(StrEnum):
    """The messages that are not a financial operation: network management and the
    batch messages, routed by MTI + network management code (``NETWORK``). A financial
    route names the ledger's ``Operation``."""

    SIGN_ON = "sign_on"
    SIGN_OFF = "sign_off"
    ECHO = "echo"
    SETTLEMENT = "settlement"
    BATCH_UPLOAD = "batch_upload"
    UPLOAD_END = "batch_upload_end"


@dataclass(frozen=True)
class Route:
    op: Operation | Network  # its value is the ``op`` of the request's log line
    required: tuple[str, ...]  # fields that must be present; otherwise 30
    supported: bool = True  # named by the protocol, provided by a later version: 40
    pin: bool = False  # the member's PIN is required (field 52)


_FIN = ("3", "11", "25", "41", "42", "60")
_CARD = ("2",)

# (MTI, F3[:2], F25, 60.1) -> route
FINANCIAL: dict[tuple[str, str, str, str], Route] = {
    ("0200", "31", "00", "01"): Route(Operation.INQUIRY, _FIN + _CARD, pin=True),
    ("0200", "00", "00", "22"): Route(Operation.ACCRUE, _FIN + _CARD + ("4",)),
    ("0200", "20", "00", "23"): Route(Operation.VOID_ACCRUAL, _FIN + _CARD + ("4", "61")),
    ("0220", "20", "00", "25"): Route(Operation.REFUND, _FIN + _CARD + ("4", "61")),
    ("0200", "00", "00", "51"): Route(Operation.REDEEM, _FIN + _CARD + ("4",), pin=True),
    ("0200", "20", "00", "52"): Route(Operation.VOID_REDEMPTION, _FIN + _CARD + ("4", "61")),
    ("0200", "40", "00", "53"): Route(Operation.CASH_OUT, _FIN + _CARD + ("4", "48"), pin=True),
    ("0200", "50", "00", "54"): Route(Operation.INSURANCE, _FIN + _CARD + ("4", "48"), pin=True),
}

# Operations a reversal may undo.
REVERSIBLE = {Operation.ACCRUE, Operation.VOID_ACCRUAL, Operation.REFUND, Operation.REDEEM,
              Operation.VOID_REDEMPTION, Operation.CASH_OUT, Operation.INSURANCE}

_BATCH = ("11", "41", "42", "48", "60")

# (MTI, network management code) -> route
NETWORK: dict[tuple[str, str], Route] = {
    ("0800", "001"): Route(Network.SIGN_ON, ("41", "42")),
    ("0800", "003"): Route(Network.SIGN_ON, ("41", "42")),
    ("0800", "004"): Route(Network.SIGN_ON, ("41", "42")),
    ("0820", "002"): Route(Network.SIGN_OFF, ("41", "42")),
    ("0820", "301"): Route(Network.ECHO, ()),
    ("0800", "301"): Route(Network.ECHO, ()),  # host-to-host echo (field 70 = 301)
    ("0800", "002"): Route(Network.SIGN_OFF, ("41", "42")),
    # Batch settlement and upload (routing.settlement): 60.2 names the batch, 11 the message.
    ("0500", "201"): Route(Network.SETTLEMENT, _BATCH),
    ("0320", "201"): Route(Network.BATCH_UPLOAD, _BATCH),
    ("0320", "202"): Route(Network.UPLOAD_END, _BATCH),  # after a batch that did not balance
    ("0320", "207"): Route(Network.UPLOAD_END, _BATCH),  # after one that did
}

REQUEST_MTIS = {"0200", "0220", "0400", "0420", "0500", "0320", "0800", "0820"}


def has_request_key(fields: dict[str, str]) -> bool:
    """Whether a request is kept under an idempotency key (terminal, batch, trace):
    every financial request but a balance inquiry, and batch settlement and upload
    (a settlement that committed closed the batch). A retransmission of one must never
    be answered 96 after its original committed."""
    if fields.get("t") in ("0500", "0320"):
        return True
    return fields.get("t") in ("0200", "0220", "0400", "0420") and not fields.get("3", "").startswith("31")


def response_mti(mti: str) -> str | None:
    """The MTI that answers ``mti`` (request + 10), or None when ``mti`` is not a
    request (a response or an unknown class cannot be answered)."""
    if len(mti) != 4 or not mti.isdigit() or mti[2] not in "02468" or mti[3] not in "02":
        return None
    return mti[:2] + str(int(mti[2]) + 1) + mti[3]


def find(fields: dict[str, str], txn_type: str, network_code: str) -> Route | None:
    mti = fields["t"]
    if mti in ("0800", "0820", "0500", "0320"):
        return NETWORK.get((mti, network_code))
    if mti in ("0400", "0420"):
        proc2 = fields.get("3", "")[:2]
        for (fmti, fproc, _cond, ftype), route in FINANCIAL.items():
            if fproc == proc2 and ftype == txn_type and route.op in REVERSIBLE and fmti in ("0200", "0220"):
                return route
        return None
    return FINANCIAL.get((mti, fields.get("3", "")[:2], fields.get("25", ""), txn_type))
