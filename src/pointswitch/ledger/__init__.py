"""Points, cards, merchants, terminals and the double-entry journal, on PostgreSQL.

Speaks domain words only (accrue, redeem, void, refund, reverse); never an ISO
field number. Every operation enters through :meth:`Ledger.execute`.
"""

from .model import (
    Command,
    Inquire,
    Operation,
    OriginalRef,
    Outcome,
    Posting,
    RequestKey,
    Reverse,
    SignOff,
    SignOn,
    Status,
)
from .service import Ledger

__all__ = [
    "Command",
    "Inquire",
    "Ledger",
    "Operation",
    "OriginalRef",
    "Outcome",
    "Posting",
    "RequestKey",
    "Reverse",
    "SignOff",
    "SignOn",
    "Status",
]
