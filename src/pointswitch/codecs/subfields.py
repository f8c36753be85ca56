"""Sub-field helpers for fields 60, 61, 54 and 48 (settlement totals, batch upload).

Pure functions over the decoded digit/text strings; each ``parse_*`` raises
``ValueError`` on a malformed value so the caller can answer 30.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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


# -- field 62: working keys in a sign-on response ---------------------------------------
# 60.3 -> (PIK length, MAK length, TDK length) in bytes. Each key travels encrypted
# under the terminal master key, followed by its 4-byte check value.
#   001: PIK(8)  + check(4) + MAK(8) + check(4)                               24 bytes
#   003: PIK(16) + check(4) + MAK(8) + 8 zero bytes + check(4)                40 bytes
#   004: as 003, then TDK(16) + check(4)                                      60 bytes
KEY_LAYOUTS = {"001": (8, 8, 0), "003": (16, 8, 0), "004": (16, 8, 16)}


@dataclass(frozen=True)
class KeyBlock:
    under_tmk: bytes
    check_value: bytes


def render_62(network_code: str, pik: KeyBlock, mak: KeyBlock, tdk: KeyBlock | None = None) -> bytes:
    """Field 62 of a sign-on response. For 003/004 the MAK slot is 16 bytes: a
    single-length MAK is followed by eight zero bytes, a double-length one fills it."""
    _pik_len, mak_len, tdk_len = KEY_LAYOUTS[network_code]
    out = pik.under_tmk + pik.check_value + mak.under_tmk
    if network_code != "001":
        if len(mak.under_tmk) not in (8, 16):
            raise ValueError("a MAK is 8 or 16 bytes")
        out += bytes(16 - len(mak.under_tmk))
    out += mak.check_value
    if tdk_len:
        if tdk is None:
            raise ValueError("scheme 004 carries a track data key")
        out += tdk.under_tmk + tdk.check_value
    return out


def parse_62(network_code: str, data: bytes, *, double_mak: bool = False
             ) -> tuple[KeyBlock, KeyBlock, KeyBlock | None]:
    """The key blocks of field 62; ``double_mak``: the terminal's MAK is double-length
    (its profile says so), filling the 16-byte MAK slot of 003/004."""
    pik_len, mak_len, tdk_len = KEY_LAYOUTS[network_code]
    expected = pik_len + 4 + mak_len + (0 if network_code == "001" else 8) + 4 + (tdk_len + 4 if tdk_len else 0)
    if len(data) != expected:
        raise ValueError(f"field 62 for {network_code} is {expected} bytes, not {len(data)}")
    i = 0

    def take(n: int) -> bytes:
        nonlocal i
        chunk = data[i : i + n]
        i += n
        return chunk

    pik = KeyBlock(take(pik_len), take(4))
    mak_key = take(mak_len)
    if network_code != "001":
        rest = take(8)
        if double_mak:
            mak_key += rest
    mak = KeyBlock(mak_key, take(4))
    tdk = KeyBlock(take(tdk_len), take(4)) if tdk_len else None
    return pik, mak, tdk


def with_results(totals: SettlementTotals, domestic: int, foreign: int) -> SettlementTotals:
    """The totals with the result digit of each block set (1 balanced, 2 not)."""
    return SettlementTotals(replace(totals.domestic, result=domestic), replace(totals.foreign, result=foreign))


# -- field 48: batch upload ----------------------------------------------------------
UPLOAD_RECORDS_PER_MESSAGE = 8


@dataclass(frozen=True)
class UploadRecord:
    """One 40-digit record: card organisation n2 + trace n6 + card number n20 (left
    zero-padded) + amount n12."""

    trace: int
    card_number: str
    amount_fen: int
    card_organisation: str = "00"

    def render(self) -> str:
        return f"{self.card_organisation}{self.trace:06d}{self.card_number.zfill(20)}{self.amount_fen:012d}"


def render_48_upload(records: list[UploadRecord]) -> str:
    """Record count n2 + the records (1 to 8)."""
    if not 1 <= len(records) <= UPLOAD_RECORDS_PER_MESSAGE:
        raise ValueError(f"a batch upload carries 1 to {UPLOAD_RECORDS_PER_MESSAGE} records")
    return f"{len(records):02d}" + "".join(r.render() for r in records)


def parse_48_upload(value: str) -> list[UploadRecord]:
    _digits(value, "field 48")
    if len(value) < 2:
        raise ValueError("a batch upload starts with its record count (n2)")
    count = int(value[:2])
    if not 1 <= count <= UPLOAD_RECORDS_PER_MESSAGE:
        raise ValueError(f"a batch upload carries 1 to {UPLOAD_RECORDS_PER_MESSAGE} records")
    if len(value) != 2 + 40 * count:
        raise ValueError(f"{count} upload records are {2 + 40 * count} digits")
    records = []
    for i in range(2, len(value), 40):
        r = value[i : i + 40]
        card = r[8:28].lstrip("0")
        if not 12 <= len(card) <= 19:
            raise ValueError("an upload record's card number is 12 to 19 digits")
        records.append(UploadRecord(int(r[2:8]), card, int(r[28:40]), r[:2]))
    return records


def render_48_upload_end(records_sent: int) -> str:
    return f"{records_sent:04d}"


def parse_48_upload_end(value: str) -> int:
    """The end of a batch upload: total records sent, n4."""
    _digits(value, "field 48")
    if len(value) != 4:
        raise ValueError("the end of a batch upload carries the records sent (4 digits)")
    return int(value)
