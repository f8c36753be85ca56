"""What every dialect shares: a field table turned into a pyiso8583 spec, decoding
with validation, and encoding.

A dialect is data: a table of ``FieldDef`` rows and an envelope (the bytes that
precede the MTI). The decoded form is the same for every dialect: a dict of
field number (as a string, the pyiso8583 convention; ``"t"`` is the MTI) to
text. Numeric fields are digit strings, binary fields are uppercase hex, text
fields are text. Routing sees the same dict whichever wire it came from.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import iso8583

Kind = Literal["n", "z", "an", "ans", "b"]
LenType = Literal["fixed", "LL", "LLL"]

Fields = dict[str, str]


@dataclass(frozen=True)
class FieldDef:
    number: int
    kind: Kind
    len_type: LenType
    max_len: int  # digits for n/z, bytes for an/ans/b
    left_aligned: bool = False  # fixed n fields are right-aligned except where noted (field 22)
    name: str = ""


_VALID: dict[str, re.Pattern[str]] = {
    "n": re.compile(r"[0-9]*"),
    "z": re.compile(r"[0-9A-F=]*"),  # track data: digits, separator D or =, hex when encrypted
    "an": re.compile(r"[0-9A-Za-z ]*"),
    "ans": re.compile(r"[\x20-\x7e]*"),
    "b": re.compile(r"[0-9A-F]*"),
}


class DecodeFailure(ValueError):
    """A frame that does not decode.

    ``fields`` holds what could be read before the failure (possibly only the
    MTI, possibly nothing) so the switch can still answer with code 30 when it
    has enough to address a response.
    """

    def __init__(self, reason: str, fields: Fields, envelope: Any = None, field_number: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.fields = fields
        self.envelope = envelope
        self.field_number = field_number


class EncodeFailure(ValueError):
    pass


@dataclass(frozen=True)
class Message:
    fields: Fields
    envelope: Any = None
    # The bytes a MAC covers: from the MTI up to (not including) field 64, when
    # field 64 is present and is the message's last field; otherwise None.
    mac_data: bytes | None = None

    @property
    def mti(self) -> str:
        return self.fields["t"]


@dataclass
class Dialect:
    """One wire format: its envelope, MTI/bitmap encoding and field table."""

    name: str
    field_defs: Mapping[int, FieldDef]
    spec: dict[str, dict[str, Any]]
    envelope_len: int = 0
    parse_envelope: Callable[[bytes], Any] = staticmethod(lambda raw: None)
    render_envelope: Callable[[Any], bytes] = staticmethod(lambda env: b"")
    # Variants of the spec accepting "F" as the pad nibble of odd-length BCD
    # fields (PROTOCOL: accept F as pad on input); tried field by field.
    f_pad_spec: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_field_number: int = 128
    mac_len: int = 8  # bytes field 64 takes on the wire

    def render_mac(self, mac: bytes) -> bytes:
        """Field 64 as it travels: raw bytes, or hex text where binary travels as hex."""
        return mac if self.spec["64"]["data_enc"] == "b" else mac.hex().upper().encode("ascii")

    def decode(self, frame: bytes) -> Message:
        if len(frame) < self.envelope_len:
            raise DecodeFailure("frame shorter than its envelope", {})
        envelope = self.parse_envelope(frame[: self.envelope_len])
        body = frame[self.envelope_len :]
        spec = self.spec
        for _ in range(len(self.f_pad_spec) + 1):
            try:
                fields, _enc = iso8583.decode(body, spec)
                break
            except iso8583.DecodeError as exc:
                if exc.field in self.f_pad_spec and spec[exc.field] is not self.f_pad_spec[exc.field]:
                    spec = dict(spec)
                    spec[exc.field] = self.f_pad_spec[exc.field]
                    continue
                partial = {k: v for k, v in exc.doc_dec.items() if k != exc.field}
                raise DecodeFailure(exc.msg, self._valid_subset(partial), envelope, exc.field) from None
            except Exception as exc:  # pyiso8583 raises KeyError etc. for bits without a spec
                raise DecodeFailure(
                    f"undecodable: {type(exc).__name__}", self._mti_only(body), envelope
                ) from None
        fields.pop("p", None)
        fields.pop("1", None)
        fields.pop("h", None)
        self._normalise(fields)
        bad = self._first_invalid(fields)
        if bad is not None:
            reason = f"field {bad} has characters its format forbids"
            raise DecodeFailure(reason, self._valid_subset(fields), envelope, bad)
        mac_data = None
        if "64" in fields and all(int(k) <= 64 for k in fields if k.isdigit()):
            mac_data = body[: len(body) - self.mac_len]
        return Message(fields, envelope, mac_data)

    def encode(self, fields: Mapping[str, str], envelope: Any = None,
               sign: Callable[[bytes], bytes] | None = None) -> bytes:
        """Encode a message; with ``sign``, field 64 carries ``sign(bytes from the MTI
        up to field 64)`` (the bitmap already has bit 64 set)."""
        doc = dict(fields)
        self._normalise(doc)  # binary as hex: either case
        bad = self._first_invalid(doc)
        if bad is not None:  # never send what our own decoder (or the peer's) would refuse
            raise EncodeFailure(f"field {bad}: not defined in {self.name} or not valid for its format")
        if sign is not None:
            doc["64"] = "00" * 8
        try:
            encoded, _ = iso8583.encode(doc, self.spec)
        except iso8583.EncodeError as exc:
            raise EncodeFailure(str(exc)) from None
        except Exception as exc:  # pyiso8583 raises KeyError etc. for fields its spec lacks
            raise EncodeFailure(f"{type(exc).__name__}: {exc}") from None
        body = bytes(encoded)
        if sign is not None:
            if any(k.isdigit() and int(k) > 64 for k in doc):
                raise EncodeFailure("a MAC in field 64 cannot cover fields above 64")
            data = body[: len(body) - self.mac_len]
            body = data + self.render_mac(sign(data))
        return self.render_envelope(envelope) + body

    def _mti_only(self, body: bytes) -> Fields:
        """The MTI alone, when the rest cannot be read: enough to answer 30."""
        tspec = self.spec["t"]
        raw = body[: tspec["max_len"]]
        try:
            mti = raw.hex() if tspec["data_enc"] == "b" else raw.decode("ascii")
        except UnicodeDecodeError:
            return {}
        return {"t": mti} if len(mti) == 4 and mti.isdigit() else {}

    # -- validation -------------------------------------------------------
    def _normalise(self, fields: Fields) -> None:
        for key, value in fields.items():
            if key.isdigit():
                fdef = self.field_defs.get(int(key))
                if fdef is not None and fdef.kind == "b":
                    fields[key] = value.upper()

    def _field_ok(self, key: str, value: str) -> bool:
        if key == "t":
            return len(value) == 4 and value.isdigit()
        if not key.isdigit():
            return True
        number = int(key)
        if number > self.max_field_number:
            return False
        fdef = self.field_defs.get(number)
        if fdef is None:
            return False
        return _VALID[fdef.kind].fullmatch(value) is not None

    def _first_invalid(self, fields: Fields) -> str | None:
        for key, value in fields.items():
            if not self._field_ok(key, value):
                return key
        return None

    def _valid_subset(self, fields: Mapping[str, str]) -> Fields:
        return {k: v for k, v in fields.items() if k not in ("p", "1", "h") and self._field_ok(k, v)}


def f_pad_variants(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For every right-padded BCD field, a copy of its spec that expects an F pad."""
    out: dict[str, dict[str, Any]] = {}
    for key, fspec in spec.items():
        if fspec.get("right_pad") == "0":
            variant = copy.deepcopy(dict(fspec))
            variant["right_pad"] = "F"
            out[key] = variant
    return out
