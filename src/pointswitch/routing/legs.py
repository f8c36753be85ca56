"""Second legs: the ISO 8583 messages pointswitch sends to upstream hosts.

A points-to-card request becomes a credit to the bank card at the ``bank``
host; a premium payment becomes a payment at the ``insurer`` host. Both are
iso87 0200 requests with a fresh trace (11) and retrieval reference (37); the
reversal that may follow is built at the same time, kept sealed with the
request, and sent as 0400 (first try) then 0420 (repeats) until the host
approves it (39 in ``REVERSAL_ACKNOWLEDGED``).
docs/upstream.md describes both sides for a host's implementers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple, Protocol

from ..codecs import Fields

# Processing codes of the second leg.
PROC_CARD_CREDIT = "260000"  # credit to the cardholder's account (cash-out of points)
PROC_PREMIUM_PAYMENT = "500000"  # payment (insurance premium)
CURRENCY_CNY = "156"

# A reversal is acknowledged only by these codes in the host's 0410 / 0430:
# 00 = undone (or remembered, when the original never arrived), 25 = original
# not found, nothing to undo. Any other code (12, 91, 96, ...) means the host
# may still hold the credit: the reversal is repeated.
REVERSAL_ACKNOWLEDGED = frozenset({"00", "25"})


class UpstreamError(Exception):
    pass


class UpstreamUnavailable(UpstreamError):
    """The request was not sent."""


class UpstreamTimeout(UpstreamError):
    """The request was sent and no answer came in time."""


class UpstreamLost(UpstreamError):
    """The request was sent and its link broke before the answer came."""


class LegIdentity(NamedTuple):
    """The trace (11) and retrieval reference (37) of one message sent upstream."""

    stan: str
    rrn: str


class UpstreamPort(Protocol):
    """What routing needs of a connector (``switch.upstream.Connector``)."""

    name: str

    @property
    def available(self) -> bool: ...

    @property
    def response_timeout_s(self) -> float: ...

    @property
    def acquirer_id(self) -> str: ...

    async def next_stan(self) -> LegIdentity: ...

    async def request(self, fields: Fields, *, timeout_s: float | None = None) -> Fields: ...


# Both come from one number of the database sequence upstream_identity_seq
# (ledger.identity), never drawn twice by any process, before or after a restart.
# 37 is that number in 12 digits: two messages share a 37 only if they share the
# number, so 37 is unique for the sequence's whole range (10^12 messages, which
# the sequence refuses to pass rather than wrap: 31 years at 1 000 a second).
# The customary year-day-hour + trace form is not used: with a 6-digit trace it
# repeats as soon as more than 999 999 messages fall in one hour, across every
# process, which nothing could rule out. 11 is the number modulo 999 999, plus 1:
# it repeats only after 999 999 further messages, long after its answer.
_RRN_MAX = 10**12


def leg_identity(number: int) -> LegIdentity:
    if not 0 <= number < _RRN_MAX:
        raise ValueError(f"identity {number} is outside 0..{_RRN_MAX - 1}")
    return LegIdentity(f"{number % 999_999 + 1:06d}", f"{number:012d}")


def transmission_time(now: datetime | None = None) -> str:
    """Field 7: MMDDhhmmss, UTC."""
    return (now or datetime.now(UTC)).strftime("%m%d%H%M%S")


def second_leg(*, insurance: bool, counterparty: str, amount_fen: int, identity: LegIdentity, terminal: str,
               merchant: str, acquirer_id: str, now: datetime | None = None) -> Fields:
    """The 0200 for the host: bank card credit (field 2 = bank card) or premium
    payment (field 48 = policy number); 11 and 37 from ``identity`` (the connector's
    ``next_stan``)."""
    now = now or datetime.now(UTC)
    local = now.astimezone()
    fields: Fields = {
        "t": "0200",
        "3": PROC_PREMIUM_PAYMENT if insurance else PROC_CARD_CREDIT,
        "4": f"{amount_fen:012d}",
        "7": transmission_time(now),
        "11": identity.stan,
        "12": local.strftime("%H%M%S"),
        "13": local.strftime("%m%d"),
        "32": acquirer_id,
        "37": identity.rrn,
        "41": terminal.ljust(8),
        "42": merchant.ljust(15),
        "49": CURRENCY_CNY,
    }
    if insurance:
        fields["48"] = counterparty
    else:
        fields["2"] = counterparty
    return fields


def reversal_of(request: Fields) -> Fields:
    """The 0400 that undoes ``request``: same 2/3/4/11/32/37/41/42/48/49, and field 90
    = original MTI + trace + transmission time + acquirer id + forwarding id (zeros)."""
    fields = {k: v for k, v in request.items() if k in ("2", "3", "4", "11", "32", "37", "41", "42", "48", "49")}
    fields["t"] = "0400"
    fields["90"] = request["t"] + request["11"] + request["7"] + request["32"].zfill(11) + "0" * 11
    return fields


def repeat_of(reversal: Fields, attempt: int) -> Fields:
    """Attempt 1 is the 0400; later attempts are 0420 repeats, with a fresh field 7."""
    fields = dict(reversal)
    fields["t"] = "0400" if attempt <= 1 else "0420"
    fields["7"] = transmission_time()
    return fields
