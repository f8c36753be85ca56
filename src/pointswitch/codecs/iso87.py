"""Dialect ``iso87``: ASCII ISO 8583:1987 (bank connectors, generic POS, upstream hosts).

ASCII MTI, bitmap as hex characters (primary, and secondary when fields 65-128
appear), ASCII fields in the 1987 formats. Binary fields (52, 55, 62, 64) travel
as uppercase hex text, as most ASCII hosts send them, so the decoded form is the
same hex string the ``cup`` dialect produces. Field 60 carries the same 60.1 /
60.2 / 60.3 digits as ``cup`` so both dialects route alike.
"""

from __future__ import annotations

import copy
from typing import Any

from iso8583.specs import default_ascii

from .cup import FIELDS as CUP_FIELDS
from .dialect import Dialect, FieldDef

# Fields whose 1987 definition differs from the cup table, plus 65-128 basics.
_OVERRIDES: list[FieldDef] = [
    FieldDef(48, "ans", "LLL", 999, name="additional data"),
    FieldDef(52, "b", "fixed", 8, name="PIN block"),
    FieldDef(54, "an", "LLL", 120, name="balances"),
    FieldDef(55, "b", "LLL", 255, name="IC card data"),
    FieldDef(60, "n", "LLL", 17, name="transaction type, batch, network code"),
    FieldDef(61, "n", "LLL", 29, name="original transaction"),
    FieldDef(62, "b", "LLL", 499, name="working keys (hex)"),
    FieldDef(63, "ans", "LLL", 163, name="operator code / additional text"),
    FieldDef(64, "b", "fixed", 8, name="MAC"),
    FieldDef(70, "n", "fixed", 3, name="network management code"),
    FieldDef(90, "n", "fixed", 42, name="original data elements"),
    FieldDef(128, "b", "fixed", 8, name="MAC (secondary)"),
]

FIELDS: dict[int, FieldDef] = {f.number: f for f in CUP_FIELDS}
FIELDS.update({f.number: f for f in _OVERRIDES})

_LEN_DIGITS = {"fixed": 0, "LL": 2, "LLL": 3}


def _spec_for(fdef: FieldDef) -> dict[str, Any]:
    # Binary travels as hex text: two characters a byte.
    max_len = fdef.max_len * 2 if fdef.kind == "b" else fdef.max_len
    return {
        "data_enc": "ascii",
        "len_enc": "ascii",
        "len_type": _LEN_DIGITS[fdef.len_type],
        "max_len": max_len,
        "desc": fdef.name,
    }


SPEC: dict[str, dict[str, Any]] = copy.deepcopy(dict(default_ascii))
SPEC.update({str(n): _spec_for(f) for n, f in FIELDS.items()})

DIALECT = Dialect(name="iso87", field_defs=FIELDS, spec=SPEC, max_field_number=128, mac_len=16)
