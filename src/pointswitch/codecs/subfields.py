"""Sub-field helpers for fields 60, 61, 54 and 48 (settlement totals).

Pure functions over the decoded digit/text strings; each ``parse_*`` raises
``ValueError`` on a malformed value so the caller can answer 30.
"""

from __future__ import annotations

from dataclasses import dataclass


def _digits(value: str, what: str) -> str:
    if not value.isdigit():
        raise ValueError(f"{what} must be digits")
    return value


# -- field 60 -----------------------------------------------------------------
@dataclass(frozen=True)
class Field60:
    """60.1 transaction type n2, 60.2 batch n6, 60.3 network management code n3, rest."""

    txn_type: str = "00"
    batch: str = "000000"
    network_code: str = ""
    rest: str = ""

    def render(self) -> str:
        return self.txn_type + self.batch + self.network_code + self.rest


def parse_60(value: str) -> Field60:
    _digits(value, "field 60")
    if len(value) < 8:
        raise ValueError("field 60 needs at least 60.1 and 60.2 (8 digits)")
    return Field60(value[:2], value[2:8], value[8:11], value[11:])


# -- field 61 -----------------------------------------------------------------
@dataclass(frozen=True)
class Field61:
    """Original transaction: batch n6 + trace n6 + date MMDD n4 (+ more)."""

    batch: str
    trace: str
    date_mmdd: str = ""
    rest: str = ""

    def render(self) -> str:
        return self.batch + self.trace + self.date_mmdd + self.rest


def parse_61(value: str) -> Field61:
    _digits(value, "field 61")
    if len(value) < 12:
        raise ValueError("field 61 needs the original batch and trace (12 digits)")
    return Field61(value[:6], value[6:12], value[12:16], value[16:])


# -- field 54 -----------------------------------------------------------------
CURRENCY_POINTS = "999"  # ISO 4217 "no currency": points
CURRENCY_CNY = "156"


@dataclass(frozen=True)
class Balance:
    """One 20-character entry: account type n2 + amount type n2 + currency n3 +
    sign C/D + amount n12."""

    amount: int
    currency: str
    account_type: str = "00"
    amount_type: str = "02"  # available balance

    def render(self) -> str:
        sign = "C" if self.amount >= 0 else "D"
        return f"{self.account_type}{self.amount_type}{self.currency}{sign}{abs(self.amount):012d}"


def render_54(balances: list[Balance]) -> str:
    return "".join(b.render() for b in balances)


def parse_54(value: str) -> list[Balance]:
    if len(value) % 20:
        raise ValueError("field 54 is a sequence of 20-character entries")
    out = []
    for i in range(0, len(value), 20):
        e = value[i : i + 20]
        if e[7] not in "CD" or not e[8:].isdigit() or not e[:7].isdigit():
            raise ValueError(f"field 54 entry {i // 20 + 1} is malformed")
        amount = int(e[8:]) * (1 if e[7] == "C" else -1)
        out.append(Balance(amount, e[4:7], e[:2], e[2:4]))
    return out


# -- field 48: settlement totals ------------------------------------------------
@dataclass(frozen=True)
class TotalsBlock:
    debit_amount_fen: int = 0
    debit_count: int = 0
    credit_amount_fen: int = 0
    credit_count: int = 0
    result: int = 0  # request 0; response 1 balanced, 2 not balanced

    def render(self) -> str:
        return (
            f"{self.debit_amount_fen:012d}{self.debit_count:03d}"
            f"{self.credit_amount_fen:012d}{self.credit_count:03d}{self.result:01d}"
        )


@dataclass(frozen=True)
class SettlementTotals:
    domestic: TotalsBlock
    foreign: TotalsBlock

    def render(self) -> str:
        return self.domestic.render() + self.foreign.render()


def _parse_block(s: str) -> TotalsBlock:
    return TotalsBlock(int(s[0:12]), int(s[12:15]), int(s[15:27]), int(s[27:30]), int(s[30]))


def parse_48_totals(value: str) -> SettlementTotals:
    _digits(value, "field 48")
    if len(value) != 62:
        raise ValueError("settlement totals are 62 digits")
    return SettlementTotals(_parse_block(value[:31]), _parse_block(value[31:]))
