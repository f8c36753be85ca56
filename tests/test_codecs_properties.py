"""Property tests: every field of every dialect round-trips, and decoding never crashes.

For each field in ``cup.FIELDS`` and in the ``iso87`` table, values are generated
from the field's own definition (kind n/z/an/ans/b, fixed or LLVAR/LLLVAR, maximum
length), and a 0200 message carrying that field must encode, frame, unframe and
decode back to the same fields. The only normalisation is the documented one
(dialect.py ``_normalise``): binary fields come back as uppercase hex. Odd-length
BCD pad nibbles are added and stripped by the codec and never show in the value.
Random messages (random subsets of fields) round-trip too, and random or mutated
bytes either decode to a ``Message`` or raise ``DecodeFailure``, nothing else.
No database, no network: pure codec.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointswitch.codecs import DecodeFailure, Dialect, FrameDecoder, Message, cup, framing, iso87
from pointswitch.codecs.dialect import FieldDef

CUP = cup.DIALECT
ISO = iso87.DIALECT
DIALECTS: dict[str, Dialect] = {"cup": CUP, "iso87": ISO}
FRAMINGS = {"cup": framing("binary2"), "iso87": framing("ascii4")}
CUP_FIELDS: list[FieldDef] = list(cup.FIELDS)
ISO_FIELDS: list[FieldDef] = [iso87.FIELDS[n] for n in sorted(iso87.FIELDS)]

SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
PER_FIELD = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))

_AN = string.digits + string.ascii_letters + " "
_ANS = "".join(chr(c) for c in range(0x20, 0x7F))
# Track data: digits and the D separator in BCD (hex A-F when encrypted); ASCII may also carry "=".
_Z = {"cup": string.digits + "ABCDEF", "iso87": string.digits + "ABCDEF="}

Pair = tuple[str, str]  # (value to encode, value expected after decoding)


def _lengths(fdef: FieldDef) -> st.SearchStrategy[int]:
    if fdef.len_type == "fixed":
        return st.just(fdef.max_len)
    return st.integers(min_value=0, max_value=fdef.max_len)


def field_value(fdef: FieldDef, dialect_name: str) -> st.SearchStrategy[Pair]:
    """A valid value for ``fdef`` and what decoding must give back for it."""
    if fdef.kind == "b":
        def hex_in_random_case(raw: bytes, upper: bool) -> Pair:
            text = raw.hex().upper() if upper else raw.hex()
            return text, raw.hex().upper()  # normalised to uppercase on decode

        return _lengths(fdef).flatmap(lambda n: st.binary(min_size=n, max_size=n)).flatmap(
            lambda raw: st.booleans().map(lambda upper: hex_in_random_case(raw, upper))
        )
    alphabet = {"n": string.digits, "z": _Z[dialect_name], "an": _AN, "ans": _ANS}[fdef.kind]
    text = _lengths(fdef).flatmap(lambda n: st.text(alphabet, min_size=n, max_size=n))
    return text.map(lambda v: (v, v))


def _round_trip(dialect_name: str, fields: dict[str, str]) -> Message:
    """Encode, frame, feed to a frame decoder, decode."""
    dialect = DIALECTS[dialect_name]
    spec = FRAMINGS[dialect_name]
    payload = dialect.encode(fields)
    frames = FrameDecoder(spec, 1 << 16).feed(spec.frame(payload))
    assert frames == [payload]
    return dialect.decode(payload)


def _check_single_field(dialect_name: str, fdef: FieldDef, pair: Pair) -> None:
    value, expected = pair
    key = str(fdef.number)
    message = _round_trip(dialect_name, {"t": "0200", "11": "000001", key: value})
    assert message.fields == {"t": "0200", "11": "000001", key: expected}


@pytest.mark.parametrize("fdef", CUP_FIELDS, ids=lambda f: f"cup-{f.number}-{f.kind}-{f.len_type}{f.max_len}")
@PER_FIELD
@given(data=st.data())
def test_cup_every_field_round_trips(fdef: FieldDef, data: st.DataObject) -> None:
    _check_single_field("cup", fdef, data.draw(field_value(fdef, "cup")))


@pytest.mark.parametrize("fdef", ISO_FIELDS, ids=lambda f: f"iso87-{f.number}-{f.kind}-{f.len_type}{f.max_len}")
@PER_FIELD
@given(data=st.data())
def test_iso87_every_field_round_trips(fdef: FieldDef, data: st.DataObject) -> None:
    _check_single_field("iso87", fdef, data.draw(field_value(fdef, "iso87")))


@st.composite
def random_message(draw: st.DrawFn, dialect_name: str) -> tuple[dict[str, str], dict[str, str]]:
    table = CUP_FIELDS if dialect_name == "cup" else ISO_FIELDS
    chosen = draw(st.lists(st.sampled_from(table), unique_by=lambda f: f.number, max_size=len(table)))
    mti = draw(st.sampled_from(["0100", "0110", "0200", "0210", "0220", "0400", "0500", "0800", "0810", "0820"]))
    sent: dict[str, str] = {"t": mti}
    expected: dict[str, str] = {"t": mti}
    for fdef in chosen:
        value, back = draw(field_value(fdef, dialect_name))
        sent[str(fdef.number)] = value
        expected[str(fdef.number)] = back
    return sent, expected


@pytest.mark.parametrize("dialect_name", ["cup", "iso87"])
@SETTINGS
@given(data=st.data())
def test_random_message_round_trips(dialect_name: str, data: st.DataObject) -> None:
    sent, expected = data.draw(random_message(dialect_name))
    message = _round_trip(dialect_name, sent)
    assert message.fields == expected
    dialect = DIALECTS[dialect_name]
    if "64" in expected and all(int(k) <= 64 for k in expected if k.isdigit()):
        body = dialect.encode(sent)[dialect.envelope_len :]
        assert message.mac_data == body[: len(body) - dialect.mac_len]
    else:
        assert message.mac_data is None


def _decode_never_crashes(dialect: Dialect, frame: bytes) -> None:
    try:
        result = dialect.decode(frame)
    except DecodeFailure as failure:
        assert isinstance(failure.fields, dict)
        return
    assert isinstance(result, Message)
    assert result.mti.isdigit() and len(result.mti) == 4


@pytest.mark.parametrize("dialect_name", ["cup", "iso87"])
@SETTINGS
@given(frame=st.binary(max_size=400))
def test_random_bytes_decode_or_fail_cleanly(dialect_name: str, frame: bytes) -> None:
    _decode_never_crashes(DIALECTS[dialect_name], frame)


@pytest.mark.parametrize("dialect_name", ["cup", "iso87"])
@SETTINGS
@given(data=st.data())
def test_mutated_messages_decode_or_fail_cleanly(dialect_name: str, data: st.DataObject) -> None:
    """Start from a valid message, then overwrite, drop or truncate bytes: this reaches
    deeper into the decoder than random bytes, which mostly fail at the MTI."""
    dialect = DIALECTS[dialect_name]
    sent, _ = data.draw(random_message(dialect_name))
    frame = bytearray(dialect.encode(sent))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        if not frame:
            break
        at = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
        action = data.draw(st.sampled_from(["overwrite", "delete", "truncate", "insert"]))
        if action == "overwrite":
            frame[at] = data.draw(st.integers(min_value=0, max_value=255))
        elif action == "delete":
            del frame[at]
        elif action == "truncate":
            del frame[at:]
        else:
            frame.insert(at, data.draw(st.integers(min_value=0, max_value=255)))
    _decode_never_crashes(dialect, bytes(frame))
