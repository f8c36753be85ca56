"""From a decoded ISO message to a response, through the ledger.

A request passes a short sequence of steps, each with one job (jPOS
TransactionManager style): find the route, check the fields, build the ledger
command, execute it, build the response. Security steps (terminal keys, MAC,
PIN) slot in between "check" and "execute".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..codecs import Fields
from ..codecs.subfields import (
    CURRENCY_CNY,
    CURRENCY_POINTS,
    Balance,
    Field60,
    parse_60,
    parse_61,
    render_54,
)
from ..ledger import (
    Command,
    Inquire,
    Ledger,
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
from . import codes, table
from .table import Op, Route

# Fields a response copies from its request (PROTOCOL: the terminal checks 3, 4, 11, 41, 42).
ECHO = ("2", "3", "4", "11", "22", "25", "32", "41", "42", "49", "60", "61")

_OPERATION = {
    Op.ACCRUE: Operation.ACCRUE,
    Op.REDEEM: Operation.REDEEM,
    Op.VOID_ACCRUAL: Operation.VOID_ACCRUAL,
    Op.VOID_REDEMPTION: Operation.VOID_REDEMPTION,
    Op.REFUND: Operation.REFUND,
}


class FormatError(ValueError):
    """The message routes but its fields do not fit the operation: code 30."""


@dataclass(frozen=True)
class Response:
    fields: Fields
    processing_requirement: int = 0  # cup header: 3 = sign on again, ...
    op: str = ""


def error_response(request: Fields, code: str) -> Response | None:
    """A response carrying only ``code`` and the echoable fields, or None when the
    request's MTI cannot be answered."""
    mti = table.response_mti(request.get("t", ""))
    if mti is None:
        return None
    fields = {k: request[k] for k in ECHO if k in request}
    fields.update({"t": mti, "39": code})
    return Response(fields)


class Router:
    def __init__(self, ledger: Ledger):
        self._ledger = ledger

    async def handle(self, request: Fields) -> Response | None:
        """Answer one decoded request; None when it cannot be answered at all."""
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
        if not route.supported:
            return self._with_op(error_response(request, codes.FUNCTION_NOT_SUPPORTED), route)
        if any(f not in request for f in route.required):
            return self._with_op(error_response(request, codes.FORMAT_ERROR), route)
        if route.op is Op.ECHO:
            return self._with_op(self._respond(request, Outcome(Status.APPROVED, host_time=_now()), route, f60), route)
        try:
            command = self._command(request, route, f60)
        except (FormatError, ValueError):
            return self._with_op(error_response(request, codes.FORMAT_ERROR), route)
        outcome = await self._ledger.execute(command)
        return self._respond(request, outcome, route, f60)

    @staticmethod
    def _with_op(response: Response | None, route: Route) -> Response | None:
        if response is None:
            return None
        return Response(response.fields, response.processing_requirement, route.op.value)

    # -- request -> command ---------------------------------------------------
    def _command(self, req: Fields, route: Route, f60: Field60) -> Command:
        terminal = req["41"].rstrip()
        merchant = req["42"].rstrip()
        if route.op is Op.SIGN_ON:
            return SignOn(terminal, merchant)
        if route.op is Op.SIGN_OFF:
            return SignOff(terminal, merchant)
        card = req["2"]
        if route.op is Op.INQUIRY:
            return Inquire(terminal, merchant, card)
        key = RequestKey(terminal, int(f60.batch), int(req["11"]))
        amount_fen = int(req["4"])
        operation = _OPERATION[route.op]
        if req["t"] in ("0400", "0420"):
            return Reverse(terminal, merchant, key, card, amount_fen, operation)
        original = None
        if route.op in (Op.VOID_ACCRUAL, Op.VOID_REDEMPTION, Op.REFUND):
            f61 = parse_61(req["61"])
            rrn = req.get("37", "").strip() if route.op is not Op.REFUND else ""
            original = OriginalRef(int(f61.batch), int(f61.trace), rrn)
        return Posting(terminal, merchant, key, card, amount_fen, operation, original)

    # -- outcome -> response ----------------------------------------------------
    def _respond(self, req: Fields, outcome: Outcome, route: Route, f60: Field60) -> Response:
        mti = table.response_mti(req["t"])
        assert mti is not None
        fields: Fields = {k: req[k] for k in ECHO if k in req}
        fields["t"] = mti
        fields["39"] = codes.FOR_STATUS[outcome.status]
        host_time = datetime.fromisoformat(outcome.host_time) if outcome.host_time else datetime.now()
        fields["12"] = host_time.strftime("%H%M%S")
        fields["13"] = host_time.strftime("%m%d")
        if route.op in (Op.SIGN_ON, Op.SIGN_OFF, Op.ECHO):
            batch = f"{outcome.batch:06d}" if outcome.batch is not None else f60.batch
            fields["60"] = Field60(f60.txn_type, batch, f60.network_code).render()
            return Response(fields, op=route.op.value)
        fields["15"] = host_time.strftime("%m%d")
        if outcome.rrn:
            fields["37"] = outcome.rrn
        if outcome.approved and outcome.auth_code:
            fields["38"] = outcome.auth_code
        if outcome.points_balance is not None:
            balances = [Balance(outcome.points_balance, CURRENCY_POINTS)]
            if outcome.cash_value_fen is not None:
                balances.append(Balance(outcome.cash_value_fen, CURRENCY_CNY))
            fields["54"] = render_54(balances)
        if outcome.approved and route.op is not Op.INQUIRY:
            fields["63"] = str(outcome.points_moved)
        return Response(fields, op=route.op.value)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
