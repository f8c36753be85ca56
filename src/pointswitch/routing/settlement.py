"""Batch settlement (0500/0510) and batch upload (0320/0330): fields to ledger
commands and back.

UnionPay terminals send these without a MAC, so a peer that knows a terminal id
(printed on every receipt) could close a real terminal's batch. They are taken:

- with a MAC in field 64 that verifies under the terminal's keys, from anywhere;
- without one, only from the address the terminal last sent a MAC-verified
  message from (the switch's guard remembers it, per process), and settlements
  no more often than the guard allows;
- on a listener that authenticates nobody (``mac = "off"``, loopback only), as
  every other message there.

Otherwise: A0 (sign on again), nothing changed. Terminal admission (profile,
listener, status) applies as for every message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import structlog

from ..codecs import Fields, Message
from ..codecs.subfields import (
    Field60,
    TotalsBlock,
    parse_48_totals,
    parse_48_upload,
    parse_48_upload_end,
    with_results,
)
from ..ledger import (
    BatchTotals,
    Command,
    EndUpload,
    Ledger,
    Outcome,
    SettleBatch,
    Status,
    TerminalAuth,
    UploadBatch,
    UploadRecord,
)
from . import auth as auth_steps
from . import codes
from .auth import Guard, Origin
from .responses import ECHO, Response, error_response
from .table import Network, Route

log = structlog.get_logger("pointswitch.routing")

SETTLEMENT_OPS = {Network.SETTLEMENT, Network.BATCH_UPLOAD, Network.UPLOAD_END}

BALANCED, NOT_BALANCED = 1, 2  # the result digit of a totals block in the 0510


def _totals(block: TotalsBlock) -> BatchTotals:
    return BatchTotals(block.debit_amount_fen, block.debit_count, block.credit_amount_fen, block.credit_count)


def command(request: Fields, route: Route, f60: Field60) -> Command:
    """The ledger command of a settlement or upload message; ValueError when its
    fields do not fit (answered 30)."""
    terminal, merchant = request["41"].rstrip(), request["42"].rstrip()
    batch, trace = int(f60.batch), int(request["11"])
    if route.op is Network.SETTLEMENT:
        totals = parse_48_totals(request["48"])
        if totals.domestic.result or totals.foreign.result:
            raise ValueError("a settlement request carries 0 in both result digits")
        return SettleBatch(terminal, merchant, batch, trace, _totals(totals.domestic))
    if route.op is Network.BATCH_UPLOAD:
        records = tuple(UploadRecord(r.trace, r.card_number, r.amount_fen, r.card_organisation)
                        for r in parse_48_upload(request["48"]))
        return UploadBatch(terminal, merchant, batch, trace, records)
    return EndUpload(terminal, merchant, batch, trace, parse_48_upload_end(request["48"]),
                     terminal_agreed=f60.network_code == "207")


class SettlementRouter:
    def __init__(self, ledger: Ledger, guard: Guard):
        self._ledger = ledger
        self._guard = guard

    async def handle(self, message: Message, route: Route, f60: Field60, origin: Origin) -> Response | None:
        request = message.fields
        try:
            cmd = command(request, route, f60)
        except ValueError:
            return _decline(request, route, codes.FORMAT_ERROR)
        auth = await self._ledger.terminal_auth(cmd.terminal_id)
        refusal = auth_steps.admit(auth, cmd.merchant_id, origin.listener)
        if refusal is not None:
            return _decline(request, route, codes.FOR_STATUS[refusal])
        assert auth is not None
        mac_fn, refusal = self._authenticate(message, auth, origin, settles=route.op is Network.SETTLEMENT)
        if refusal is not None:
            log.warning("batch message refused", op=route.op.value, terminal=auth.terminal_id, peer=origin.peer,
                        reason=refusal.value, mac_present="64" in request)
            return _decline(request, route, codes.FOR_STATUS[refusal])
        outcome = await self._ledger.execute(cmd)
        response = _respond(request, route, outcome)
        return replace(response, sign=mac_fn, authenticated=True) if mac_fn is not None else response

    def _authenticate(self, message: Message, auth: TerminalAuth, origin: Origin, *, settles: bool
                      ) -> tuple[Callable[[bytes], bytes] | None, Status | None]:
        """The MAC function to sign the answer with (None: no MAC) and the refusal, if any."""
        if origin.listener.mac == "off":
            return None, None
        mac_fn = None
        if "64" in message.fields:
            session = auth_steps.verified_session(message, auth, origin.listener.mac)
            if session is None:
                self._guard.mac_failed(auth.terminal_id, origin.peer)  # counted like any MAC failure
                return None, Status.NOT_SIGNED_ON
            mac_fn = auth_steps.mac_function(origin.listener.mac, session.mak)
        refusal = self._guard.settlement_refusal(auth.terminal_id, origin.peer, mac_verified=mac_fn is not None,
                                                 settles=settles)
        return mac_fn, refusal


def _decline(request: Fields, route: Route, code: str) -> Response | None:
    response = error_response(request, code)
    return None if response is None else replace(response, op=route.op.value)


def _respond(request: Fields, route: Route, outcome: Outcome) -> Response:
    fields: Fields = {k: request[k] for k in ECHO if k in request}
    fields["t"] = "0510" if request["t"] == "0500" else "0330"
    fields["39"] = codes.FOR_STATUS[outcome.status]
    host_time = datetime.fromisoformat(outcome.host_time) if outcome.host_time else datetime.now()
    fields["12"] = host_time.strftime("%H%M%S")
    fields["13"] = host_time.strftime("%m%d")
    if route.op is Network.SETTLEMENT and outcome.approved:
        # 15: the business date the batch settles on; 48: the terminal's totals, each
        # block marked balanced or not (no foreign cards here: balanced when zero).
        fields["15"] = outcome.business_date[5:7] + outcome.business_date[8:10]
        totals = parse_48_totals(request["48"])
        domestic = BALANCED if outcome.extra.get("agree") else NOT_BALANCED
        foreign = BALANCED if totals.foreign.render() == "0" * 31 else NOT_BALANCED
        fields["48"] = with_results(totals, domestic, foreign).render()
    return Response(fields, processing_requirement=3 if fields["39"] in codes.SIGN_ON_AGAIN else 0,
                    op=route.op.value)
