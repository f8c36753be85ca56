"""From ISO 8583 fields to ledger commands and back; response codes. No SQL, no sockets."""

from .router import Response, Router, Security, error_response

__all__ = ["Response", "Router", "Security", "error_response"]
