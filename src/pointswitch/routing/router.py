"""From a decoded ISO message to a response, through the ledger.

A request passes a short sequence of steps, each with one job (jPOS
TransactionManager style): find the route, check the fields, build the ledger
command, execute it, build the response. Security steps (terminal keys, MAC,
PIN) slot in between "check" and "execute".
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime

import structlog

from ..codecs import Fields, Message
from ..codecs.subfields import (
    CURRENCY_CNY,
    CURRENCY_POINTS,
    Balance,
    Field60,
    KeyBlock,
    parse_60,
    parse_61,
    render_54,
    render_62,
)
from ..ledger import (
    UPSTREAM_OPERATIONS,
    Command,
    CompleteUpstream,
    DropSession,
    Inquire,
    KeyScheme,
    Ledger,
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
    UpstreamLeg,
)
from . import auth as auth_steps
from . import codes, legs, table
from .auth import Guard, OpenGuard, Origin
from .legs import UpstreamLost, UpstreamPort, UpstreamTimeout, UpstreamUnavailable
from .responses import ECHO, Response, error_response
from .settlement import SETTLEMENT_OPS, SettlementRouter
from .table import Network, Route

_BANK_CARD = re.compile(r"[0-9]{12,19}")
_POLICY = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,39}")


log = structlog.get_logger("pointswitch.routing")

# 60.3 of a sign-on -> the working keys it asks for
_KEY_SCHEMES = {"001": KeyScheme.SINGLE, "003": KeyScheme.DOUBLE, "004": KeyScheme.DOUBLE_WITH_TRACK}


class FormatError(ValueError):
    """The message routes but its fields do not fit the operation: code 30."""


class Router:
    def __init__(self, ledger: Ledger, connectors: Mapping[Operation, UpstreamPort] | None = None,
                 guard: Guard | None = None):
        """``connectors``: the upstream host that carries each two-phase operation;
        an operation with none is answered 40. ``guard``: the switch's per-peer
        accounting of sign-ons and MAC failures."""
        self._ledger = ledger
        self._connectors = dict(connectors or {})
        self._guard = guard or OpenGuard()
        self._settlement = SettlementRouter(ledger, self._guard)

    async def handle(self, message: Message, origin: Origin) -> Response | None:
        """Answer one decoded request; None when it cannot be answered at all."""
        request = message.fields
        if table.response_mti(request["t"]) is None:
            return None
        try:
            f60 = parse_60(request["60"]) if "60" in request else Field60()
        except ValueError:
            return error_response(request, codes.FORMAT_ERROR)
        network_code = f60.network_code or request.get("70", "")
        route = table.find(request, f60.txn_type, network_code)
        if route is None:
            return error_response(request, codes.INVALID_TRANSACTION)
        if not route.supported or (route.op in UPSTREAM_OPERATIONS and route.op not in self._connectors):
            return self._with_op(error_response(request, codes.FUNCTION_NOT_SUPPORTED), route)
        if any(f not in request for f in route.required):
            return self._with_op(error_response(request, codes.FORMAT_ERROR), route)
        if route.op is Network.ECHO:
            return self._respond(request, Outcome(Status.APPROVED, host_time=_now()), route, f60)
        if route.op in SETTLEMENT_OPS:
            return await self._settlement.handle(message, route, f60, origin)
        try:
            command = self._command(request, route, f60)
        except (FormatError, ValueError):
            return self._with_op(error_response(request, codes.FORMAT_ERROR), route)
        auth = await self._ledger.terminal_auth(command.terminal_id)
        refusal = auth_steps.admit(auth, command.merchant_id, origin.listener)
        if refusal is not None:
            return self._decline(request, route, refusal)
        assert auth is not None
        if isinstance(command, SignOn):
            return await self._sign_on(request, route, f60, command, auth, origin)
        if route.op is Network.SIGN_OFF:
            return await self._sign_off(message, route, f60, auth, origin)
        return await self._financial(message, route, f60, command, auth, origin)

    async def _sign_on(self, request: Fields, route: Route, f60: Field60, command: SignOn, auth: TerminalAuth,
                       origin: Origin) -> Response | None:
        """Issue pending working keys: the keys in use stay valid until the terminal
        uses the new ones, so a sign-on by anyone else changes nothing for it."""
        if command.scheme is KeyScheme.SINGLE and not auth.profile.single_des_allowed:
            log.warning("sign-on refused: single-length keys not allowed for this terminal",
                        terminal=command.terminal_id, peer=origin.peer)
            return self._decline(request, route, Status.WRONG_LISTENER)
        if not self._guard.sign_on_allowed(command.terminal_id, origin.peer):
            log.warning("sign-on refused: too frequent", terminal=command.terminal_id, peer=origin.peer)
            return self._decline(request, route, Status.TOO_FREQUENT)
        command = replace(command, peer=origin.peer, activate=origin.listener.mac == "off")
        return self._respond(request, await self._ledger.execute(command), route, f60)

    async def _sign_off(self, message: Message, route: Route, f60: Field60, auth: TerminalAuth,
                        origin: Origin) -> Response | None:
        """Acknowledged always; the keys are withdrawn only when the 0820 carries a MAC
        that verifies (UnionPay terminals send none: their keys then simply stay)."""
        request = message.fields
        session = None
        if origin.listener.mac != "off" and "64" in request:
            session = auth_steps.verified_session(message, auth, origin.listener.mac)
        if session is not None:
            await self._ledger.execute(DropSession(auth.terminal_id, auth.merchant_id, "sign_off"))
        else:
            log.info("sign-off without a valid MAC: acknowledged, keys kept", terminal=auth.terminal_id,
                     peer=origin.peer)
        response = self._respond(request, Outcome(Status.APPROVED, host_time=_now()), route, f60)
        return replace(response, authenticated=session is not None)

    async def _financial(self, message: Message, route: Route, f60: Field60, command: Command,
                         auth: TerminalAuth, origin: Origin) -> Response | None:
        """Verify the MAC (from memory), check track and PIN, then post."""
        request = message.fields
        session = auth.current
        mac_fn = None
        if origin.listener.mac != "off":
            session = await self._authenticate(message, auth, origin)
            if session is None:
                return self._decline(request, route, Status.NOT_SIGNED_ON)
            mac_fn = auth_steps.mac_function(origin.listener.mac, session.mak)
        authenticated = mac_fn is not None
        if authenticated:  # where this terminal really is: settlement without a MAC is taken from here
            self._guard.verified(auth.terminal_id, origin.peer)
        if "35" in request and not auth_steps.track_matches(request, session):
            return self._signed(self._decline(request, route, Status.UNKNOWN_CARD), mac_fn)
        if route.pin and isinstance(command, Inquire | Posting):
            command = replace(command, pin_required=True, pin=auth_steps.clear_pin(request, session))
        if isinstance(command, Posting) and command.operation in UPSTREAM_OPERATIONS:
            outcome = await self._two_phase(command, self._connectors[command.operation],
                                            insurance=command.operation is Operation.INSURANCE)
        else:
            outcome = await self._ledger.execute(command)
        response = self._respond(request, outcome, route, f60, authenticated=authenticated)
        return self._signed(response, mac_fn)

    async def _authenticate(self, message: Message, auth: TerminalAuth, origin: Origin) -> Session | None:
        """The key set the message's MAC verifies under (pending keys are promoted);
        None, counted against the terminal and the peer, when there is none."""
        session = auth_steps.verified_session(message, auth, origin.listener.mac)
        if session is None:  # another process may have just changed the keys: look once more
            fresh = await self._ledger.terminal_auth(auth.terminal_id, refresh=True)
            if fresh is not None and auth_steps.admit(fresh, auth.merchant_id, origin.listener) is None:
                auth = fresh
                session = auth_steps.verified_session(message, auth, origin.listener.mac)
        if session is None:
            request = message.fields
            log.warning("MAC missing or wrong", terminal=auth.terminal_id, trace=request.get("11"),
                        mti=request["t"], mac_present="64" in request, peer=origin.peer)
            if self._guard.mac_failed(auth.terminal_id, origin.peer):
                log.error("too many MAC failures for this terminal: its working keys are withdrawn",
                          terminal=auth.terminal_id)
                await self._ledger.execute(DropSession(auth.terminal_id, auth.merchant_id, "mac_failures"))
            return None
        if session.pending:
            promoted = await self._ledger.execute(PromoteKeys(auth.terminal_id, auth.merchant_id, session.generation))
            if not promoted.approved:
                return None
        return session

    async def _two_phase(self, command: Posting, connector: UpstreamPort, *, insurance: bool) -> Outcome:
        """Hold the points, send the second leg, then post or release. Nothing is held
        when the host is unreachable; an unanswered leg is released and reversed."""
        if not connector.available:
            # A retransmission is answered with what happened to its original (which
            # may have been paid) before the host's absence is: 91 means nothing held.
            stored = await self._ledger.stored(command)
            if stored is not None:
                if stored.status is Status.PENDING:
                    return await self._wait_for_completion(command, connector.response_timeout_s + 1)
                return stored
            log.warning("upstream host unavailable", connector=connector.name, terminal=command.terminal_id)
            return Outcome(Status.UPSTREAM_UNAVAILABLE, host_time=_now())
        leg = legs.second_leg(insurance=insurance, counterparty=command.counterparty, amount_fen=command.amount_fen,
                              identity=await connector.next_stan(), terminal=command.terminal_id,
                              merchant=command.merchant_id, acquirer_id=connector.acquirer_id)
        reversal = json.dumps(legs.reversal_of(leg)).encode()
        # Past this, a request still pending is timed out by the forwarder's sweep
        # (for instance when this process stopped while the leg was out).
        deadline_s = connector.response_timeout_s * 2 + 5
        command = replace(command, upstream=UpstreamLeg(connector.name, leg["37"], reversal, deadline_s))
        held = await self._ledger.execute(command)
        if held.status is not Status.PENDING:
            return held  # declined before anything left, or a retransmission of a finished request
        if held.replayed:  # the leg ends within the connector's response timeout; then 09
            return await self._wait_for_completion(command, connector.response_timeout_s + 1)
        result, rc, reference = "approved", "", ""
        try:
            reply = await connector.request(leg)
        except UpstreamUnavailable:
            result = "unavailable"
        except UpstreamTimeout:
            result = "timeout"
        except UpstreamLost:
            result = "lost"
        else:
            rc = reply.get("39", "")
            reference = (reply.get("63") or reply.get("38") or "").strip()
            if rc != codes.APPROVED:
                result = "declined"
        return await self._ledger.execute(
            CompleteUpstream(command.terminal_id, command.merchant_id, command.key, result, rc, reference))

    async def _wait_for_completion(self, command: Posting, deadline_s: float) -> Outcome:
        """A retransmission of a request whose upstream leg is still out: answer when it ends."""
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline_s
        outcome = Outcome(Status.PENDING, host_time=_now())
        while loop.time() < until:
            await asyncio.sleep(0.1)
            outcome = await self._ledger.execute(command)
            if outcome.status is not Status.PENDING:
                break
        return outcome

    def _decline(self, request: Fields, route: Route, status: Status) -> Response | None:
        return self._with_op(error_response(request, codes.FOR_STATUS[status]), route)

    @staticmethod
    def _signed(response: Response | None, mac_fn: Callable[[bytes], bytes] | None) -> Response | None:
        """A response to an authenticated request carries its MAC (under the same MAK)."""
        if response is None or mac_fn is None:
            return response
        return replace(response, sign=mac_fn, authenticated=True)

    @staticmethod
    def _with_op(response: Response | None, route: Route) -> Response | None:
        if response is None:
            return None
        return Response(response.fields, response.processing_requirement, route.op.value)

    # -- request -> command ---------------------------------------------------
    def _command(self, req: Fields, route: Route, f60: Field60) -> Command:
        terminal = req["41"].rstrip()
        merchant = req["42"].rstrip()
        if route.op is Network.SIGN_ON:
            return SignOn(terminal, merchant, _KEY_SCHEMES.get(f60.network_code, KeyScheme.DOUBLE))
        if route.op is Network.SIGN_OFF:
            return Command(terminal, merchant)
        operation = route.op
        assert isinstance(operation, Operation)  # echo and the batch messages are answered before
        card = req["2"]
        if operation is Operation.INQUIRY:
            return Inquire(terminal, merchant, card)
        key = RequestKey(terminal, int(f60.batch), int(req["11"]))
        amount_fen = int(req["4"])
        if req["t"] in ("0400", "0420"):
            return Reverse(terminal, merchant, key, card, amount_fen, operation)
        original = None
        if operation in (Operation.VOID_ACCRUAL, Operation.VOID_REDEMPTION, Operation.REFUND):
            f61 = parse_61(req["61"])
            rrn = req.get("37", "").strip() if operation is not Operation.REFUND else ""
            original = OriginalRef(int(f61.batch), int(f61.trace), rrn)
        counterparty = ""
        if operation in UPSTREAM_OPERATIONS:
            counterparty = req["48"].strip()
            pattern = _POLICY if operation is Operation.INSURANCE else _BANK_CARD
            if not pattern.fullmatch(counterparty):
                raise FormatError("field 48 is not a bank card number or policy number")
        return Posting(terminal, merchant, key, card, amount_fen, operation, original, counterparty=counterparty)

    # -- outcome -> response ----------------------------------------------------
    def _respond(self, req: Fields, outcome: Outcome, route: Route, f60: Field60, *,
                 authenticated: bool = False) -> Response:
        mti = table.response_mti(req["t"])
        assert mti is not None
        fields: Fields = {k: req[k] for k in ECHO if k in req}
        fields["t"] = mti
        fields["39"] = codes.FOR_STATUS[outcome.status]
        upstream_rc = outcome.extra.get("upstream_rc", "")
        if outcome.status is Status.UPSTREAM_DECLINED and upstream_rc in codes.UPSTREAM_PASS_THROUGH:
            fields["39"] = upstream_rc
        host_time = datetime.fromisoformat(outcome.host_time) if outcome.host_time else datetime.now()
        fields["12"] = host_time.strftime("%H%M%S")
        fields["13"] = host_time.strftime("%m%d")
        if route.op in (Network.SIGN_ON, Network.SIGN_OFF, Network.ECHO):
            batch = f"{outcome.batch:06d}" if outcome.batch is not None else f60.batch
            fields["60"] = Field60(f60.txn_type, batch, f60.network_code).render()
            if outcome.key_exchange is not None:
                kx = outcome.key_exchange
                network_code = f60.network_code if f60.network_code in ("001", "003", "004") else "003"
                fields["62"] = render_62(
                    network_code, KeyBlock(kx.pik.under_tmk, kx.pik.check_value),
                    KeyBlock(kx.mak.under_tmk, kx.mak.check_value),
                    KeyBlock(kx.tdk.under_tmk, kx.tdk.check_value) if kx.tdk else None,
                ).hex().upper()
            return Response(fields, op=route.op.value)
        # 15: the business day the request belongs to (past the cut-off: the next one).
        fields["15"] = outcome.business_date[5:7] + outcome.business_date[8:10] if outcome.business_date \
            else host_time.strftime("%m%d")
        if outcome.rrn:
            fields["37"] = outcome.rrn
        if outcome.approved and outcome.auth_code:
            fields["38"] = outcome.auth_code
        # A balance only to an authenticated terminal, on an approval (the ledger gives
        # none for a reversal whose original it has not seen).
        if outcome.points_balance is not None and authenticated and outcome.approved:
            balances = [Balance(outcome.points_balance, CURRENCY_POINTS)]
            if outcome.cash_value_fen is not None:
                balances.append(Balance(outcome.cash_value_fen, CURRENCY_CNY))
            fields["54"] = render_54(balances)
        # 44: what expires next on the card (approved accruals, to an authenticated terminal, when something expires):
        # the last valid business date YYYYMMDD and the points, n12 (docs/integrator.md).
        next_expiry = outcome.extra.get("next_expiry")
        if outcome.approved and authenticated and route.op is Operation.ACCRUE and next_expiry:
            fields["44"] = next_expiry["date"].replace("-", "") + f"{min(next_expiry['points'], 10**12 - 1):012d}"
        if outcome.approved and route.op is Operation.INSURANCE:
            fields["63"] = outcome.extra.get("upstream_reference", "")[:163] or str(outcome.points_moved)
        elif outcome.approved and route.op is not Operation.INQUIRY:
            fields["63"] = str(outcome.points_moved)
        return Response(fields, processing_requirement=3 if fields["39"] in codes.SIGN_ON_AGAIN else 0,
                        op=route.op.value)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
