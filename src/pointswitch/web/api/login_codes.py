"""How a member's one-time login code reaches the member: one small seam.

The messages module (outbox, SMS) plugs in its own :class:`CodeSender` through
``WebServices.extra["code_sender"]``; without one, :class:`StoredCodes` keeps
each code sealed under the master key in ``member_code_deliveries`` until it
expires, where the demo and the tests read it (``ledger.members.delivered_code``).
A code is never logged, and never stored in clear.
"""

from __future__ import annotations

from typing import Protocol

from ...ledger.members import MemberCards


class CodeSender(Protocol):
    async def send(self, card_index: str, code: str) -> None:
        """Deliver ``code`` to the holder of the card (by its card index)."""
        ...


class StoredCodes:
    """The default: the code kept sealed for a local reader (no channel configured)."""

    def __init__(self, members: MemberCards):
        self._members = members

    async def send(self, card_index: str, code: str) -> None:
        await self._members.store_delivery(card_index, code)
