"""Dialect ``cup``: UnionPay-style POS terminals (PROTOCOL.md).

    LEN(2) | TPDU(5) | HEADER(6) | MTI(2, BCD) | BITMAP(8) | fields...

The framing (LEN) is the listener's business; this module starts at the TPDU.
BCD everywhere numeric, ASCII for text, raw bytes for binary, BCD length
prefixes. Only the primary bitmap (fields 2-64) is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dialect import Dialect, FieldDef, f_pad_variants

# number, kind, length type, max length, left-aligned, name
FIELDS: list[FieldDef] = [
    FieldDef(2, "n", "LL", 19, name="primary account number"),
    FieldDef(3, "n", "fixed", 6, name="processing code"),
    FieldDef(4, "n", "fixed", 12, name="amount, fen"),
    FieldDef(5, "n", "fixed", 12),
    FieldDef(6, "n", "fixed", 12),
    FieldDef(7, "n", "fixed", 10, name="transmission date and time"),
    FieldDef(8, "n", "fixed", 8),
    FieldDef(9, "n", "fixed", 8),
    FieldDef(10, "n", "fixed", 8),
    FieldDef(11, "n", "fixed", 6, name="trace number"),
    FieldDef(12, "n", "fixed", 6, name="local time hhmmss"),
    FieldDef(13, "n", "fixed", 4, name="local date MMDD"),
    FieldDef(14, "n", "fixed", 4, name="expiry YYMM"),
    FieldDef(15, "n", "fixed", 4, name="settlement date MMDD"),
    FieldDef(16, "n", "fixed", 4),
    FieldDef(17, "n", "fixed", 4),
    FieldDef(18, "n", "fixed", 4),
    FieldDef(19, "n", "fixed", 3),
    FieldDef(20, "n", "fixed", 3),
    FieldDef(21, "n", "fixed", 3),
    FieldDef(22, "n", "fixed", 3, left_aligned=True, name="entry mode"),
    FieldDef(23, "n", "fixed", 3, name="card sequence number"),
    FieldDef(24, "n", "fixed", 3),
    FieldDef(25, "n", "fixed", 2, name="condition code"),
    FieldDef(26, "n", "fixed", 2, name="PIN capture code"),
    FieldDef(27, "n", "fixed", 1),
    FieldDef(28, "an", "fixed", 9),
    FieldDef(29, "an", "fixed", 9),
    FieldDef(30, "an", "fixed", 9),
    FieldDef(31, "an", "fixed", 9),
    FieldDef(32, "n", "LL", 11, name="acquiring institution"),
    FieldDef(33, "n", "LL", 11),
    FieldDef(34, "ans", "LL", 28),
    FieldDef(35, "z", "LL", 37, name="track 2"),
    FieldDef(36, "z", "LLL", 104, name="track 3"),
    FieldDef(37, "an", "fixed", 12, name="retrieval reference number"),
    FieldDef(38, "an", "fixed", 6, name="authorization code"),
    FieldDef(39, "an", "fixed", 2, name="response code"),
    FieldDef(40, "an", "fixed", 3),
    FieldDef(41, "ans", "fixed", 8, name="terminal id"),
    FieldDef(42, "ans", "fixed", 15, name="merchant id"),
    FieldDef(43, "ans", "fixed", 40),
    FieldDef(44, "ans", "LL", 25, name="additional response data"),
    FieldDef(45, "ans", "LL", 76),
    FieldDef(46, "ans", "LLL", 999),
    FieldDef(47, "ans", "LLL", 999),
    FieldDef(48, "n", "LLL", 322, name="additional data"),
    FieldDef(49, "an", "fixed", 3, name="currency"),
    FieldDef(50, "an", "fixed", 3),
    FieldDef(51, "an", "fixed", 3),
    FieldDef(52, "b", "fixed", 8, name="PIN block"),
    FieldDef(53, "n", "fixed", 16, name="security control"),
    FieldDef(54, "an", "LLL", 120, name="balances"),
    FieldDef(55, "b", "LLL", 255, name="IC card data"),
    FieldDef(56, "ans", "LLL", 999),
    FieldDef(57, "ans", "LLL", 999),
    FieldDef(58, "ans", "LLL", 100),
    FieldDef(59, "ans", "LLL", 600),
    FieldDef(60, "n", "LLL", 17, name="transaction type, batch, network code"),
    FieldDef(61, "n", "LLL", 29, name="original transaction"),
    FieldDef(62, "b", "LLL", 512, name="working keys"),
    FieldDef(63, "ans", "LLL", 163, name="operator code / additional text"),
    FieldDef(64, "b", "fixed", 8, name="MAC"),
]

_LEN_BYTES = {"fixed": 0, "LL": 1, "LLL": 2}


def _spec_for(fdef: FieldDef) -> dict[str, Any]:
    spec: dict[str, Any] = {"len_type": _LEN_BYTES[fdef.len_type], "max_len": fdef.max_len, "desc": fdef.name}
    spec["len_enc"] = "bcd" if fdef.len_type != "fixed" else "b"
    if fdef.kind in ("n", "z"):
        spec.update(data_enc="b", len_count="nibbles")
        if fdef.len_type != "fixed" or fdef.left_aligned:
            spec["right_pad"] = "0"
        else:
            spec["left_pad"] = "0"
    elif fdef.kind == "b":
        spec.update(data_enc="b", len_count="bytes")
    else:
        spec.update(data_enc="ascii", len_count="bytes")
    return spec


SPEC: dict[str, dict[str, Any]] = {
    "h": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 0, "desc": "header (handled outside)"},
    "t": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 2, "desc": "MTI, BCD"},
    "p": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 8, "desc": "primary bitmap"},
    **{str(f.number): _spec_for(f) for f in FIELDS},
}


@dataclass(frozen=True)
class Envelope:
    """TPDU (5 bytes) and the 6-byte BCD header that precede the MTI."""

    tpdu: bytes = bytes.fromhex("6000030000")
    header: bytes = bytes.fromhex("603100000000")

    @property
    def processing_requirement(self) -> int:
        return self.header[2] & 0x0F

    def reply(self, processing_requirement: int = 0) -> Envelope:
        """The envelope of a response: TPDU addresses swapped, header echoed with
        the processing requirement set (0 = nothing, 3 = sign on again, ...)."""
        tpdu = self.tpdu[:1] + self.tpdu[3:5] + self.tpdu[1:3]
        header = bytearray(self.header)
        header[2] = (header[2] & 0xF0) | (processing_requirement & 0x0F)
        return Envelope(tpdu, bytes(header))


def _parse_envelope(raw: bytes) -> Envelope:
    return Envelope(raw[:5], raw[5:11])


def _render_envelope(env: Envelope | None) -> bytes:
    env = env or Envelope()
    return env.tpdu + env.header


DIALECT = Dialect(
    name="cup",
    field_defs={f.number: f for f in FIELDS},
    spec=SPEC,
    envelope_len=11,
    parse_envelope=_parse_envelope,
    render_envelope=_render_envelope,
    f_pad_spec=f_pad_variants(SPEC),
    max_field_number=64,
)
