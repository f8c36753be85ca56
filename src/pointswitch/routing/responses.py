"""What routing answers with: a response's fields and how the switch sends it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..codecs import Fields
from . import codes, table

# Fields a response copies from its request (PROTOCOL: the terminal checks 3, 4, 11, 41, 42).
ECHO = ("2", "3", "4", "11", "22", "25", "32", "41", "42", "49", "60", "61")


@dataclass(frozen=True)
class Response:
    fields: Fields
    processing_requirement: int = 0  # cup header: 3 = sign on again, ...
    op: str = ""
    sign: Callable[[bytes], bytes] | None = field(default=None, repr=False)  # computes field 64
    authenticated: bool = False  # the request carried a MAC that verified


def error_response(request: Fields, code: str) -> Response | None:
    """A response carrying only ``code`` and the echoable fields, or None when the
    request's MTI cannot be answered."""
    mti = table.response_mti(request.get("t", ""))
    if mti is None:
        return None
    fields = {k: request[k] for k in ECHO if k in request}
    fields.update({"t": mti, "39": code})
    return Response(fields, processing_requirement=3 if code in codes.SIGN_ON_AGAIN else 0)
