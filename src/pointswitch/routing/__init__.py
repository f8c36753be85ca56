"""From ISO 8583 fields to ledger commands and back; response codes. No SQL, no sockets."""

from .auth import Guard, ListenerPolicy, Origin
from .router import Response, Router, error_response

__all__ = ["Guard", "ListenerPolicy", "Origin", "Response", "Router", "error_response"]
