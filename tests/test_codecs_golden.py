"""Golden bytes: the codecs produce and read exactly the wire PROTOCOL.md describes.

Every expected frame below was written by hand from PROTOCOL.md, field by field
(``cup`` as hex, ``iso87`` as ASCII byte literals since that dialect is text),
never produced by the codec under test. Each message is checked both ways:
encode(fields) == golden bytes, and decode(golden bytes) == fields. The length
framing (binary2 for ``cup``, ascii4 for ``iso87``) is part of the golden frame.
Sub-field helpers (60, 61, 54, 48, 62) and the frame decoder are covered too.
No database, no network: pure codec.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pointswitch.codecs import DecodeFailure, EncodeFailure, FrameDecoder, FramingError, cup, framing, iso87
from pointswitch.codecs.subfields import (
    Balance,
    Field60,
    Field61,
    KeyBlock,
    SettlementTotals,
    TotalsBlock,
    parse_48_totals,
    parse_54,
    parse_60,
    parse_61,
    parse_62,
    render_54,
    render_62,
)

CUP = cup.DIALECT
ISO = iso87.DIALECT
BIN2 = framing("binary2")
ASCII4 = framing("ascii4")


def hx(*parts: str) -> bytes:
    """Join hand-written hex pieces into bytes."""
    return bytes.fromhex("".join(parts))


# -- common values ----------------------------------------------------------------
PAN = "6212345678901234567"  # 19 digits: odd, so BCD needs a pad nibble
TID = "POS00001"  # ans8 -> 50 4F 53 30 30 30 30 31
MID = "898100012340001"  # ans15 -> 38 39 38 31 30 30 30 31 32 33 34 30 30 30 31
TID_HEX = "504F533030303031"
MID_HEX = "383938313030303132333430303031"
REQUEST_ENVELOPE = cup.Envelope(tpdu=hx("6000030000"), header=hx("603100000000"))
RESPONSE_ENVELOPE = cup.Envelope(tpdu=hx("6000000003"), header=hx("603100000000"))


@dataclass(frozen=True)
class Golden:
    name: str
    fields: dict[str, str]
    frame: bytes  # length header included
    envelope: cup.Envelope | None = None


# -- cup: sign-on request 0800 ----------------------------------------------------------
CUP_SIGN_ON = Golden(
    "cup 0800 sign-on",
    {"t": "0800", "11": "000001", "41": TID, "42": MID, "60": "00" + "000001" + "001", "63": "01 "},
    hx(
        "003C",  # LEN: 60 bytes follow (5 + 6 + 2 + 8 + 3 + 8 + 15 + 8 + 5)
        "6000030000",  # TPDU: 60, destination 0003, source 0000
        "603100000000",  # HEADER: app 60, version 31, status 0, processing 0, sub-version 000000
        "0800",  # MTI BCD
        "0020000000C00012",  # BITMAP: 11 | 41 42 | 60 63
        "000001",  # 11 n6 trace
        TID_HEX,  # 41 ans8 "POS00001"
        MID_HEX,  # 42 ans15 "898100012340001"
        "0011" "000000010010",  # 60 LLLVAR: 11 digits "00"+"000001"+"001", left-aligned, 0 pad nibble
        "0003" "303120",  # 63 LLLVAR ans: 3 bytes "01 " (operator code)
    ),
    REQUEST_ENVELOPE,
)

# -- cup: sign-on response 0810 with working keys for 60.3 = 003 ----------------------------
KEYS_003_HEX = (
    "0123456789ABCDEFFEDCBA9876543210"  # PIK (16) under TMK
    "11223344"  # PIK check value
    "1032547698BADCFE"  # MAK (8) under TMK
    "0000000000000000"  # eight zero bytes
    "55667788"  # MAK check value
)
CUP_SIGN_ON_RESPONSE = Golden(
    "cup 0810 sign-on response",
    {
        "t": "0810", "11": "000001", "12": "143015", "13": "0612", "37": "000000000001", "39": "00",
        "41": TID, "42": MID, "60": "00" + "000001" + "003", "62": KEYS_003_HEX,
    },
    hx(
        "0074",  # LEN: 116 bytes follow (21 + 3 + 3 + 2 + 12 + 2 + 8 + 15 + 8 + 42)
        "6000000003",  # TPDU: destination and source swapped
        "603100000000",  # HEADER echoed, processing requirement 0
        "0810",  # MTI BCD
        "00380000" "0AC00014",  # BITMAP: 11 12 13 | 37 39 | 41 42 | 60 62
        "000001",  # 11 n6
        "143015",  # 12 n6 hhmmss
        "0612",  # 13 n4 MMDD
        "303030303030303030303031",  # 37 an12 "000000000001"
        "3030",  # 39 an2 "00"
        TID_HEX,  # 41
        MID_HEX,  # 42
        "0011" "000000010030",  # 60 LLLVAR 11 digits "00000001003" + pad nibble
        "0040", KEYS_003_HEX,  # 62 LLLVAR b: 40 bytes
    ),
    RESPONSE_ENVELOPE,
)

# -- cup: accrual request 0200 with MAC ----------------------------------------------------
CUP_ACCRUAL_MAC = "4131423243334434"  # field 64: the MAC "A1B2C3D4" travels as 8 ASCII bytes
CUP_ACCRUAL_MAC_DATA = hx(  # what the MAC covers: from the MTI up to (not including) field 64
    "0200",  # MTI BCD
    "7020048000C08011",  # BITMAP: 2 3 4 | 11 | 22 | 25 | 41 42 | 49 | 60 64
    "19" "62123456789012345670",  # 2 LLVAR n: 19 digits, left-aligned, 0 pad nibble on the right
    "000000",  # 3 n6 processing code 00xxxx
    "000000012345",  # 4 n12 amount 123.45 yuan in fen
    "000123",  # 11 n6 trace
    "0210",  # 22 n3 LEFT-aligned: "021" -> 02 10
    "00",  # 25 n2 condition code
    TID_HEX,  # 41 ans8
    MID_HEX,  # 42 ans15
    "313536",  # 49 an3 "156"
    "0008" "22000001",  # 60 LLLVAR 8 digits: 60.1 = 22 accrual, 60.2 batch 000001
)
CUP_ACCRUAL = Golden(
    "cup 0200 accrual",
    {
        "t": "0200", "2": PAN, "3": "000000", "4": "000000012345", "11": "000123", "22": "021", "25": "00",
        "41": TID, "42": MID, "49": "156", "60": "22000001", "64": CUP_ACCRUAL_MAC,
    },
    hx(
        "0057",  # LEN: 87 bytes follow (5 + 6 + 68 MAC data + 8 MAC)
        "6000030000",  # TPDU
        "603100000000",  # HEADER
        CUP_ACCRUAL_MAC_DATA.hex(),  # MTI .. field 60, spelled out above
        CUP_ACCRUAL_MAC,  # 64 b64: 8 bytes
    ),
    REQUEST_ENVELOPE,
)

# -- cup: accrual response 0210 ----------------------------------------------------------
BALANCES_54 = "0002999C000000001234" + "0002156C000000000617"  # 1234 points, worth 6.17 yuan
BALANCES_54_HEX = (
    "30303032" "393939" "43" "303030303030303031323334"  # 00 02 | 999 | C | 000000001234
    "30303032" "313536" "43" "303030303030303030363137"  # 00 02 | 156 | C | 000000000617
)
CUP_ACCRUAL_RESPONSE = Golden(
    "cup 0210 accrual response",
    {
        "t": "0210", "2": PAN, "3": "000000", "4": "000000012345", "11": "000123", "12": "143015", "13": "0612",
        "15": "0612", "25": "00", "37": "061214000123", "38": "A00001", "39": "00", "41": TID, "42": MID,
        "49": "156", "54": BALANCES_54, "60": "22000001", "63": "123", "64": "3545364637413842",
    },
    hx(
        "009F",  # LEN: 159 bytes follow
        "6000000003",  # TPDU swapped
        "603100000000",  # HEADER echoed
        "0210",  # MTI BCD
        "703A0080" "0EC08413",  # BITMAP: 2 3 4 | 11 12 13 15 | 25 | 37 38 39 | 41 42 | 49 54 | 60 63 64
        "19" "62123456789012345670",  # 2 LLVAR n19 + pad nibble
        "000000",  # 3
        "000000012345",  # 4
        "000123",  # 11
        "143015",  # 12 hhmmss
        "0612",  # 13 MMDD
        "0612",  # 15 settlement MMDD
        "00",  # 25
        "303631323134303030313233",  # 37 an12 "061214000123"
        "413030303031",  # 38 an6 "A00001"
        "3030",  # 39 an2 "00"
        TID_HEX,  # 41
        MID_HEX,  # 42
        "313536",  # 49 "156"
        "0040", BALANCES_54_HEX,  # 54 LLLVAR an: 40 bytes, two 20-character entries
        "0008" "22000001",  # 60
        "0003" "313233",  # 63 LLLVAR ans "123" (points earned)
        "3545364637413842",  # 64 MAC "5E6F7A8B" as 8 ASCII bytes
    ),
    RESPONSE_ENVELOPE,
)

# -- iso87: accrual request 0200 and response 0210 ------------------------------------------
ISO_ACCRUAL = Golden(
    "iso87 0200 accrual",
    {
        "t": "0200", "2": PAN, "3": "000000", "4": "000000012345", "11": "000123", "22": "021", "25": "00",
        "41": TID, "42": MID, "49": "156", "60": "22000001", "64": "0123456789ABCDEF",
    },
    b"".join([
        b"0123",  # LEN: 4 ASCII digits, 123 bytes follow
        b"0200",  # MTI ASCII
        b"7020048000C08011",  # BITMAP as 16 hex characters: 2 3 4 | 11 | 22 | 25 | 41 42 | 49 | 60 64
        b"19" b"6212345678901234567",  # 2 LLVAR: two ASCII length digits, no padding
        b"000000",  # 3 n6
        b"000000012345",  # 4 n12
        b"000123",  # 11 n6
        b"021",  # 22 n3
        b"00",  # 25 n2
        b"POS00001",  # 41 ans8
        b"898100012340001",  # 42 ans15
        b"156",  # 49 an3
        b"008" b"22000001",  # 60 LLLVAR ASCII, same 60.1/60.2 digits as cup
        b"0123456789ABCDEF",  # 64 b64: 8 bytes as 16 uppercase hex characters
    ]),
)
ISO_ACCRUAL_RESPONSE = Golden(
    "iso87 0210 accrual response",
    {
        "t": "0210", "2": PAN, "3": "000000", "4": "000000012345", "11": "000123", "12": "143015", "13": "0612",
        "15": "0612", "25": "00", "37": "061214000123", "38": "A00001", "39": "00", "41": TID, "42": MID,
        "49": "156", "54": BALANCES_54, "60": "22000001", "63": "123", "64": "FEDCBA9876543210",
    },
    b"".join([
        b"0203",  # LEN: 203 bytes follow
        b"0210",  # MTI
        b"703A00800EC08413",  # BITMAP: 2 3 4 | 11 12 13 15 | 25 | 37 38 39 | 41 42 | 49 54 | 60 63 64
        b"19" b"6212345678901234567",  # 2
        b"000000",  # 3
        b"000000012345",  # 4
        b"000123",  # 11
        b"143015",  # 12
        b"0612",  # 13
        b"0612",  # 15
        b"00",  # 25
        b"061214000123",  # 37 an12
        b"A00001",  # 38 an6
        b"00",  # 39 an2
        b"POS00001",  # 41
        b"898100012340001",  # 42
        b"156",  # 49
        b"040" b"0002999C000000001234" b"0002156C000000000617",  # 54 LLLVAR: 40 characters
        b"008" b"22000001",  # 60
        b"003" b"123",  # 63
        b"FEDCBA9876543210",  # 64 as hex text
    ]),
)

# -- iso87: host-to-host echo 0800 / 0810 (field 70 = 301, secondary bitmap) ------------------
ISO_ECHO = Golden(
    "iso87 0800 echo",
    {"t": "0800", "7": "0612143015", "11": "000001", "70": "301"},
    b"".join([
        b"0055",  # LEN: 55 bytes follow
        b"0800",  # MTI
        b"8220000000000000",  # primary BITMAP: 1 (secondary present) 7 | 11
        b"0400000000000000",  # secondary BITMAP: 70
        b"0612143015",  # 7 n10 MMDDhhmmss
        b"000001",  # 11 n6
        b"301",  # 70 n3 echo
    ]),
)
ISO_ECHO_RESPONSE = Golden(
    "iso87 0810 echo response",
    {"t": "0810", "7": "0612143015", "11": "000001", "39": "00", "70": "301"},
    b"".join([
        b"0057",  # LEN: 57 bytes follow
        b"0810",  # MTI
        b"8220000002000000",  # primary BITMAP: 1 7 | 11 | 39
        b"0400000000000000",  # secondary BITMAP: 70
        b"0612143015",  # 7
        b"000001",  # 11
        b"00",  # 39
        b"301",  # 70
    ]),
)

CUP_GOLDEN = [CUP_SIGN_ON, CUP_SIGN_ON_RESPONSE, CUP_ACCRUAL, CUP_ACCRUAL_RESPONSE]
ISO_GOLDEN = [ISO_ACCRUAL, ISO_ACCRUAL_RESPONSE, ISO_ECHO, ISO_ECHO_RESPONSE]


# ===================================================================================
# messages
# ===================================================================================
@pytest.mark.parametrize("golden", CUP_GOLDEN, ids=lambda g: g.name)
def test_cup_encode_matches_golden(golden: Golden) -> None:
    assert BIN2.frame(CUP.encode(golden.fields, golden.envelope)).hex().upper() == golden.frame.hex().upper()


@pytest.mark.parametrize("golden", CUP_GOLDEN, ids=lambda g: g.name)
def test_cup_decode_golden(golden: Golden) -> None:
    frames = FrameDecoder(BIN2, 4096).feed(golden.frame)
    assert len(frames) == 1
    message = CUP.decode(frames[0])
    assert message.fields == golden.fields
    assert message.envelope == golden.envelope


@pytest.mark.parametrize("golden", ISO_GOLDEN, ids=lambda g: g.name)
def test_iso87_encode_matches_golden(golden: Golden) -> None:
    assert ASCII4.frame(ISO.encode(golden.fields)) == golden.frame


@pytest.mark.parametrize("golden", ISO_GOLDEN, ids=lambda g: g.name)
def test_iso87_decode_golden(golden: Golden) -> None:
    frames = FrameDecoder(ASCII4, 4096).feed(golden.frame)
    assert len(frames) == 1
    assert ISO.decode(frames[0]).fields == golden.fields


def test_cup_default_envelope_is_the_spec_example() -> None:
    """Without an envelope the codec sends TPDU 60 00 03 00 00 and header 60 31 00 00 00 00."""
    fields = dict(CUP_SIGN_ON.fields)
    assert BIN2.frame(CUP.encode(fields)) == CUP_SIGN_ON.frame


def test_cup_mac_covers_mti_to_field_60() -> None:
    """sign() is given every byte from the MTI up to field 64, bitmap bit 64 already set;
    its 8 ASCII bytes become field 64; decode exposes the same bytes as mac_data."""
    seen: list[bytes] = []

    def sign(data: bytes) -> bytes:
        seen.append(data)
        return b"A1B2C3D4"

    fields = {k: v for k, v in CUP_ACCRUAL.fields.items() if k != "64"}
    assert BIN2.frame(CUP.encode(fields, REQUEST_ENVELOPE, sign=sign)) == CUP_ACCRUAL.frame
    assert seen == [CUP_ACCRUAL_MAC_DATA]
    assert CUP.decode(CUP_ACCRUAL.frame[2:]).mac_data == CUP_ACCRUAL_MAC_DATA


def test_iso87_mac_travels_as_hex_text() -> None:
    """PROTOCOL does not say how iso87 carries binary fields ("the usual 1987 formats");
    this pins the codec's documented choice (iso87.py): 8 bytes as 16 uppercase hex characters."""
    fields = {k: v for k, v in ISO_ACCRUAL.fields.items() if k != "64"}
    framed = ASCII4.frame(ISO.encode(fields, sign=lambda data: hx("0123456789ABCDEF")))
    assert framed == ISO_ACCRUAL.frame
    assert ISO.decode(ISO_ACCRUAL.frame[4:]).mac_data == ISO_ACCRUAL.frame[4:-16]


def test_cup_variable_bcd_accepts_f_pad() -> None:
    """PROTOCOL: an odd digit count is padded with 0 on the right; accept F as pad on input."""
    frame = hx(
        "6000030000", "603100000000",  # envelope
        "0200",  # MTI
        "4000000000000010",  # BITMAP: 2 | 60
        "19" "6212345678901234567F",  # 2: F pad nibble
        "0011" "22000001000F",  # 60: 11 digits, F pad nibble
    )
    assert CUP.decode(frame).fields == {"t": "0200", "2": PAN, "60": "22000001000"}


def test_cup_variable_bcd_rejects_other_pad() -> None:
    frame = hx("6000030000", "603100000000", "0200", "4000000000000000", "19" "62123456789012345677")
    with pytest.raises(DecodeFailure):
        CUP.decode(frame)


def test_cup_fixed_odd_numeric_is_right_aligned() -> None:
    """Fixed n fields are right-aligned BCD: n3 field 23 "001" -> 00 01; n1 field 27 "5" -> 05."""
    frame = hx(
        "6000030000", "603100000000",
        "0200",  # MTI
        "0000022000000000",  # BITMAP: 23 | 27
        "0001",  # 23 n3 "001", right-aligned
        "05",  # 27 n1 "5", right-aligned
    )
    fields = {"t": "0200", "23": "001", "27": "5"}
    assert CUP.encode(fields) == frame
    assert CUP.decode(frame).fields == fields


def test_cup_track2_is_bcd_with_d_separator() -> None:
    """35 z..37: length counts digits; the separator travels as the nibble D."""
    track = "6212345678901234567D2512101"  # 27 characters: odd, 0 pad nibble
    frame = hx(
        "6000030000", "603100000000",
        "0200",
        "0000000020000000",  # BITMAP: 35 (byte 4, bit 0x20)
        "27" "6212345678901234567D25121010",  # 35 LLVAR BCD, pad nibble
    )
    assert CUP.encode({"t": "0200", "35": track}) == frame
    assert CUP.decode(frame).fields == {"t": "0200", "35": track}


def test_cup_settlement_48_on_the_wire() -> None:
    """48 n...322 LLLVAR: 62 digits of settlement totals -> length 00 62, 31 bytes BCD."""
    totals = "000000012345" "003" "000000000000" "000" "0" + "000000000000" "000" "000000000000" "000" "0"
    frame = hx(
        "6000030000", "603100000000",
        "0500",  # MTI settlement
        "0000000000010000",  # BITMAP: 48 (byte 5, bit 0x01)
        "0062",  # LLL: 62 digits
        "00000001234500300000000000000000" "000000000000000000000000000000",  # 62 digits, even: no pad
    )
    assert CUP.encode({"t": "0500", "48": totals}) == frame
    assert CUP.decode(frame).fields == {"t": "0500", "48": totals}


def test_cup_response_envelope_swaps_tpdu_and_sets_processing_requirement() -> None:
    request = cup.Envelope(tpdu=hx("6000050003"), header=hx("603100000000"))
    reply = request.reply(processing_requirement=3)
    assert reply.tpdu == hx("6000030005")  # destination and source swapped
    assert reply.header == hx("603103000000")  # 4th nibble: processing requirement 3 (sign on again)
    assert reply.processing_requirement == 3
    assert request.reply().header == hx("603100000000")


@pytest.mark.xfail(strict=True, reason="PROTOCOL: an/ans fields are right-padded with spaces; the codec refuses "
                                       "a short fixed an/ans value instead of padding it (callers pad)")
def test_cup_short_ans_field_is_space_padded() -> None:
    frame = hx("6000030000", "603100000000", "0800", "0000000000800000", "504F533120202020")  # 41 "POS1    "
    assert CUP.encode({"t": "0800", "41": "POS1"}) == frame


def test_cup_short_ans_field_is_refused_not_truncated() -> None:
    with pytest.raises(EncodeFailure):
        CUP.encode({"t": "0800", "41": "POS1"})


def test_cup_secondary_bitmap_is_refused_on_decode() -> None:
    """PROTOCOL: cup uses only the primary bitmap (fields 2-64)."""
    frame = hx(
        "6000030000", "603100000000",
        "0800",  # MTI
        "8000000000000000",  # BITMAP: bit 1 (a secondary bitmap follows)
        "0400000000000000",  # would-be secondary bitmap: 70
        "0301",  # would-be field 70
    )
    with pytest.raises(DecodeFailure):
        CUP.decode(frame)


@pytest.mark.parametrize("number", ["65", "70"])
def test_cup_encode_refuses_fields_above_64(number: str) -> None:
    """PROTOCOL: cup uses only the primary bitmap, so a field above 64 cannot be sent."""
    with pytest.raises(EncodeFailure):
        CUP.encode({"t": "0800", "11": "000001", number: "301"})


def test_cup_encode_refuses_non_digits_in_n_field() -> None:
    with pytest.raises(EncodeFailure):
        CUP.encode({"t": "0200", "3": "12A456"})


def test_iso87_encode_refuses_non_digits_in_n_field() -> None:
    with pytest.raises(EncodeFailure):
        ISO.encode({"t": "0200", "3": "ABCDEF"})


def test_iso87_over_binary2_framing() -> None:
    """PROTOCOL: iso87 length header is 4 ASCII digits or 2 bytes binary (per listener)."""
    payload = ISO_ECHO.frame[4:]
    framed = hx("0037") + payload  # 55 bytes as a 2-byte binary length
    assert BIN2.frame(ISO.encode(ISO_ECHO.fields)) == framed
    assert [ISO.decode(f).fields for f in FrameDecoder(BIN2, 4096).feed(framed)] == [ISO_ECHO.fields]


# ===================================================================================
# sub-fields
# ===================================================================================
def test_field_60_render_and_parse() -> None:
    sign_on = Field60("00", "000001", "001")
    assert sign_on.render() == "00" "000001" "001"
    assert parse_60("00000001001") == sign_on
    assert parse_60("22000001") == Field60("22", "000001", "", "")
    assert parse_60("2200000100050") == Field60("22", "000001", "000", "50")  # 60.4.. kept as rest
    assert Field60("22", "000001").render() == "22000001"


@pytest.mark.parametrize("bad", ["", "2200000", "22A00001", "2200000 "])
def test_field_60_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_60(bad)


def test_field_61_render_and_parse() -> None:
    original = Field61("000001", "000123", "0612")
    assert original.render() == "000001" "000123" "0612"
    assert parse_61("0000010001230612") == original
    assert parse_61("000001000123") == Field61("000001", "000123", "", "")  # void: batch + trace only
    assert parse_61("00000100012306129") == Field61("000001", "000123", "0612", "9")


@pytest.mark.parametrize("bad", ["", "00000100012", "00000100012X"])
def test_field_61_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_61(bad)


def test_field_54_balances() -> None:
    balances = [Balance(1234, "999"), Balance(617, "156")]
    #            acct  amt  cur  sign amount n12
    expected = ("00" "02" "999" "C" "000000001234"
                "00" "02" "156" "C" "000000000617")
    assert render_54(balances) == expected
    assert parse_54(expected) == balances
    debit = "00" "02" "999" "D" "000000000050"
    assert Balance(-50, "999").render() == debit
    assert parse_54(debit) == [Balance(-50, "999")]
    assert parse_54("10" "01" "156" "C" "000000000001") == [Balance(1, "156", "10", "01")]


@pytest.mark.parametrize("bad", ["0002999C00000000123", "0002999X000000001234", "0002999C00000000123A",
                                 "00A2999C000000001234"])
def test_field_54_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_54(bad)


def test_field_48_settlement_totals() -> None:
    request = SettlementTotals(TotalsBlock(12345, 3, 0, 0, 0), TotalsBlock())
    expected = (
        "000000012345" "003" "000000000000" "000" "0"  # domestic: debit amount, count, credit amount, count, result
        "000000000000" "000" "000000000000" "000" "0"  # foreign
    )
    assert len(expected) == 62
    assert request.render() == expected
    assert parse_48_totals(expected) == request
    balanced = SettlementTotals(TotalsBlock(12345, 3, 500, 1, 1), TotalsBlock(result=1))
    expected_balanced = (
        "000000012345" "003" "000000000500" "001" "1"
        "000000000000" "000" "000000000000" "000" "1"
    )
    assert balanced.render() == expected_balanced
    assert parse_48_totals(expected_balanced) == balanced


@pytest.mark.parametrize("bad", ["0" * 61, "0" * 63, "0" * 61 + "A"])
def test_field_48_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_48_totals(bad)


PIK8 = KeyBlock(hx("0123456789ABCDEF"), hx("11223344"))
PIK16 = KeyBlock(hx("0123456789ABCDEFFEDCBA9876543210"), hx("11223344"))
MAK8 = KeyBlock(hx("1032547698BADCFE"), hx("55667788"))
TDK16 = KeyBlock(hx("00112233445566778899AABBCCDDEEFF"), hx("99AABBCC"))


def test_field_62_layout_001() -> None:
    expected = hx(
        "0123456789ABCDEF",  # PIK (8)
        "11223344",  # check
        "1032547698BADCFE",  # MAK (8)
        "55667788",  # check
    )
    assert len(expected) == 24
    assert render_62("001", PIK8, MAK8) == expected
    assert parse_62("001", expected) == (PIK8, MAK8, None)


def test_field_62_layout_003() -> None:
    expected = hx(
        "0123456789ABCDEFFEDCBA9876543210",  # PIK (16)
        "11223344",  # check
        "1032547698BADCFE",  # MAK (8)
        "0000000000000000",  # eight zero bytes
        "55667788",  # check
    )
    assert len(expected) == 40
    assert render_62("003", PIK16, MAK8) == expected
    assert parse_62("003", expected) == (PIK16, MAK8, None)
    assert expected.hex().upper() == KEYS_003_HEX


def test_field_62_layout_004() -> None:
    """PROTOCOL names 004 (double-length + track key) without spelling out its layout;
    this is the 003 layout followed by TDK (16) + check (4), as subfields.py documents."""
    expected = hx(
        "0123456789ABCDEFFEDCBA9876543210",  # PIK (16)
        "11223344",  # check
        "1032547698BADCFE",  # MAK (8)
        "0000000000000000",  # eight zero bytes
        "55667788",  # check
        "00112233445566778899AABBCCDDEEFF",  # TDK (16)
        "99AABBCC",  # check
    )
    assert len(expected) == 60
    assert render_62("004", PIK16, MAK8, TDK16) == expected
    assert parse_62("004", expected) == (PIK16, MAK8, TDK16)


@pytest.mark.parametrize(("code", "size"), [("001", 23), ("001", 40), ("003", 24), ("003", 60), ("004", 40)])
def test_field_62_wrong_length(code: str, size: int) -> None:
    with pytest.raises(ValueError):
        parse_62(code, bytes(size))


def test_field_62_004_needs_track_key() -> None:
    with pytest.raises(ValueError):
        render_62("004", PIK16, MAK8)


# ===================================================================================
# framing
# ===================================================================================
def test_framing_headers() -> None:
    assert BIN2.frame(b"\x01\x02\x03") == hx("0003", "010203")
    assert ASCII4.frame(b"abc") == b"0003abc"
    assert BIN2.encode_length(300) == hx("012C")
    assert ASCII4.encode_length(300) == b"0300"
    assert BIN2.decode_length(hx("FFFF")) == 65535
    assert ASCII4.decode_length(b"9999") == 9999


@pytest.mark.parametrize(("spec_name", "n"), [("binary2", 65536), ("ascii4", 10000)])
def test_framing_length_too_large_to_encode(spec_name: str, n: int) -> None:
    with pytest.raises(FramingError):
        framing(spec_name).encode_length(n)


@pytest.mark.parametrize("golden", [CUP_SIGN_ON, ISO_ECHO], ids=lambda g: g.name)
def test_frame_decoder_byte_by_byte(golden: Golden) -> None:
    spec = BIN2 if golden in CUP_GOLDEN else ASCII4
    decoder = FrameDecoder(spec, 4096)
    payload = golden.frame[spec.header_len :]
    for i, byte in enumerate(golden.frame):
        frames = decoder.feed(bytes([byte]))
        if i < len(golden.frame) - 1:
            assert frames == []
            assert decoder.partial
        else:
            assert frames == [payload]
    assert not decoder.partial


def test_frame_decoder_several_frames_in_one_chunk() -> None:
    chunk = CUP_SIGN_ON.frame + CUP_ACCRUAL.frame + hx("0001", "FF")
    frames = FrameDecoder(BIN2, 4096).feed(chunk)
    assert frames == [CUP_SIGN_ON.frame[2:], CUP_ACCRUAL.frame[2:], hx("FF")]


def test_frame_decoder_frame_split_across_chunks() -> None:
    decoder = FrameDecoder(ASCII4, 4096)
    first, second = ISO_ACCRUAL.frame, ISO_ECHO.frame
    assert decoder.feed(first + second[:3]) == [first[4:]]  # the header of the second is itself split
    assert decoder.partial
    assert decoder.feed(second[3:20]) == []
    assert decoder.feed(second[20:] + first[:10]) == [second[4:]]
    assert decoder.feed(first[10:]) == [first[4:]]
    assert not decoder.partial


def test_frame_decoder_limit() -> None:
    assert FrameDecoder(BIN2, 3).feed(hx("0003", "010203")) == [hx("010203")]  # at the limit: fine
    with pytest.raises(FramingError):
        FrameDecoder(BIN2, 3).feed(hx("0004"))  # over the limit: refused as soon as the header is in
    with pytest.raises(FramingError):
        FrameDecoder(ASCII4, 2048).feed(b"2049")


@pytest.mark.parametrize("header", [b"00A1", b" 123", b"12 3", b"-123", b"+123", b"0x10", b"\x00\x00\x00\x05"])
def test_frame_decoder_ascii4_non_digit_length(header: bytes) -> None:
    with pytest.raises(FramingError):
        FrameDecoder(ASCII4, 4096).feed(header + b"0800")


@pytest.mark.parametrize(("spec_name", "header"), [("binary2", hx("0000")), ("ascii4", b"0000")])
def test_frame_decoder_zero_length(spec_name: str, header: bytes) -> None:
    with pytest.raises(FramingError):
        FrameDecoder(framing(spec_name), 4096).feed(header)
