"""Points, cards, merchants, terminals and the double-entry journal, on PostgreSQL.

Speaks domain words only (accrue, redeem, void, refund, reverse); never an ISO
field number. Every operation enters through :meth:`Ledger.execute`.
"""

from .model import (
    UPSTREAM_OPERATIONS,
    Command,
    CompleteUpstream,
    DropSession,
    ExpiryRule,
    Inquire,
    KeyExchange,
    KeyScheme,
    Operation,
    OriginalRef,
    Outcome,
    Posting,
    PromoteKeys,
    RequestKey,
    Reverse,
    Session,
    SignOn,
    Status,
    TerminalAuth,
    TerminalProfile,
    UpstreamLeg,
    UsageRule,
    WrappedKey,
)
from .service import Ledger

__all__ = [
    "UPSTREAM_OPERATIONS",
    "Command",
    "CompleteUpstream",
    "UpstreamLeg",
    "UsageRule",
    "DropSession",
    "ExpiryRule",
    "KeyExchange",
    "KeyScheme",
    "Session",
    "WrappedKey",
    "Inquire",
    "Ledger",
    "Operation",
    "OriginalRef",
    "Outcome",
    "Posting",
    "RequestKey",
    "Reverse",
    "PromoteKeys",
    "SignOn",
    "Status",
    "TerminalAuth",
    "TerminalProfile",
]
