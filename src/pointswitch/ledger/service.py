"""The ledger: every operation enters through :meth:`Ledger.execute`.

Each command runs in one PostgreSQL transaction (``core``: what the steps share,
the order of work that keeps lock order fixed); the steps live by kind:
``postings`` (inquiry, accrual, redemption, void, refund), ``holds`` (points
leaving through an upstream host), ``reversals``, ``batches`` (settlement and
batch upload), ``lots`` (points by expiry; ``expire_due`` for the day close).
Terminal keys and PINs are in ``terminals`` and ``pins``; the business day in
``days``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import asyncpg

from . import gate
from .batches import BatchSteps
from .core import _KeyTaken, clawback_due, points_for_cash, points_for_value
from .decide import cash_value_fen, earned_points
from .model import (
    CompleteUpstream,
    DropSession,
    EndUpload,
    Inquire,
    Operation,
    Outcome,
    Posting,
    PromoteKeys,
    Reverse,
    SettleBatch,
    SignOn,
    UploadBatch,
)
from .pins import LegacyPin
from .postings import PostingSteps
from .reversals import ReversalSteps

__all__ = ["Ledger", "cash_value_fen", "clawback_due", "earned_points", "points_for_cash", "points_for_value"]


class Ledger(PostingSteps, ReversalSteps, BatchSteps):
    def _command_handlers(self) -> dict[type, Callable[[Any], Awaitable[Outcome]]]:
        return {
            SignOn: self._sign_on,
            PromoteKeys: self._promote,
            DropSession: self._drop_session,
            Inquire: self._inquire,
            Posting: self._posting,
            Reverse: self._reverse,
            CompleteUpstream: self._complete_upstream,
            SettleBatch: self._settle,
            UploadBatch: self._upload,
            EndUpload: self._end_upload,
        }

    async def _posting(self, cmd: Posting) -> Outcome:
        card_index = self._vault.card_index(cmd.card_number)
        if self._group is not None and cmd.operation is Operation.ACCRUE and not cmd.pin_required:
            # Written with others; the batch finds a taken key itself (and answers from the log).
            return await self._group.submit(cmd, card_index, self._fingerprint(cmd))
        # A retransmission is answered from the log (and costs no PIN try). Knowing the
        # key is free is also what lets a later 96 be true: no earlier attempt committed.
        stored = await self.stored(cmd)
        if stored is not None:
            return stored
        gate.current().key_checked = True
        try:
            return await self._post_once(cmd, card_index, pin_checked=False)
        except LegacyPin:  # an old-form PIN hash: checked before the transaction, holding no connection
            cmd = replace(cmd, pin_refusal=await self._pins.check(cmd.card_number, card_index, cmd.pin))
            return await self._post_once(cmd, card_index, pin_checked=True)

    async def _post_once(self, cmd: Posting, card_index: str, *, pin_checked: bool) -> Outcome:
        """The request's transaction: context, the PIN (card row locked), the operation's step."""
        try:
            async with self._transaction() as con:
                ctx = await self._context(con, cmd, card_index)
                if isinstance(ctx, Outcome):
                    return ctx
                if cmd.pin_required and not pin_checked:  # (locks the card row, as the steps expect)
                    cmd = replace(cmd, pin_refusal=await self._pins.check_locked(con, cmd.card_number, card_index,
                                                                                  cmd.pin))
                elif cmd.pin_required:
                    await con.execute("SELECT 1 FROM cards WHERE card_index = $1 FOR UPDATE", card_index)
                step = _STEPS[cmd.operation]
                return await step(self, con, ctx, cmd)
        except _KeyTaken:  # an identical request committed meanwhile: a 96 now would hide it
            gate.current().key_checked = False
            return await self._replay(cmd.key, self._fingerprint(cmd))


_STEPS: dict[Operation, Callable[[Ledger, asyncpg.Connection, asyncpg.Record, Posting], Awaitable[Outcome]]] = {
    Operation.ACCRUE: Ledger._accrue,
    Operation.REDEEM: Ledger._redeem,
    Operation.VOID_ACCRUAL: Ledger._void,
    Operation.VOID_REDEMPTION: Ledger._void,
    Operation.REFUND: Ledger._refund,
    Operation.CASH_OUT: Ledger._hold,
    Operation.INSURANCE: Ledger._hold,
}

