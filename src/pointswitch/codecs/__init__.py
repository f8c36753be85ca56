"""Wire formats: pure functions and small classes, no I/O.

``dialect(name)`` gives a :class:`Dialect` (``cup`` or ``iso87``);
``framing(name)`` gives a length framing (``binary2`` or ``ascii4``).
"""

from . import crypto, cup, iso87
from .dialect import DecodeFailure, Dialect, EncodeFailure, Fields, Message
from .framing import FrameDecoder, FramingError, FramingSpec, framing

DIALECTS: dict[str, Dialect] = {"cup": cup.DIALECT, "iso87": iso87.DIALECT}


def dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; known: {', '.join(DIALECTS)}") from None


__all__ = [
    "DIALECTS",
    "DecodeFailure",
    "Dialect",
    "EncodeFailure",
    "Fields",
    "FrameDecoder",
    "FramingError",
    "FramingSpec",
    "Message",
    "crypto",
    "dialect",
    "framing",
]
