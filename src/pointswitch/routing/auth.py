"""Who sent a message, and may it do what it asks: the authentication steps.

Pure functions over a terminal's in-memory :class:`TerminalAuth` (status,
profile, working keys): nothing here touches the database, so a forged MAC is
refused at the cost of a few DES blocks. The switch supplies a :class:`Guard`
that counts what peers do (sign-on rates, MAC failures) and refuses abusers.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..codecs import Fields, Message, crypto
from ..ledger import Session, Status, TerminalAuth

MacFn = Callable[[bytes], bytes]


@dataclass(frozen=True)
class ListenerPolicy:
    """How a listener authenticates: its dialect and MAC method (ecb, x919, off)."""

    name: str
    dialect: str
    mac: str


@dataclass(frozen=True)
class Origin:
    """Where a message came from: the listener and the peer's address (no port)."""

    listener: ListenerPolicy
    peer: str = ""


class Guard(Protocol):
    """What routing reports to, and asks of, the switch's per-peer accounting."""

    def sign_on_allowed(self, terminal_id: str, peer: str) -> bool: ...

    def mac_failed(self, terminal_id: str, peer: str) -> bool:
        """Count a MAC failure; True when the terminal's session must be dropped."""
        ...

    def verified(self, terminal_id: str, peer: str) -> None:
        """The terminal sent a message whose MAC verified, from ``peer``."""
        ...

    def settlement_refusal(self, terminal_id: str, peer: str, *, mac_verified: bool, settles: bool) -> Status | None:
        """Why a batch settlement (``settles``) or upload is refused, or None: without a
        MAC only from the peer the terminal last authenticated from; settlements rate-limited."""
        ...


class OpenGuard:
    """Counts nothing, refuses nothing: for routing used without a switch."""

    def sign_on_allowed(self, terminal_id: str, peer: str) -> bool:
        return True

    def mac_failed(self, terminal_id: str, peer: str) -> bool:
        return False

    def verified(self, terminal_id: str, peer: str) -> None:
        return None

    def settlement_refusal(self, terminal_id: str, peer: str, *, mac_verified: bool, settles: bool) -> Status | None:
        return None


def admit(auth: TerminalAuth | None, merchant_id: str, listener: ListenerPolicy) -> Status | None:
    """None when the terminal may talk here; else why not."""
    if auth is None:
        return Status.UNKNOWN_TERMINAL
    if auth.merchant_id != merchant_id or not auth.merchant_active:
        return Status.WRONG_MERCHANT
    if not auth.terminal_active:
        return Status.TERMINAL_DISABLED
    if auth.profile.dialect != listener.dialect or auth.profile.mac_method != listener.mac:
        return Status.WRONG_LISTENER
    return None


def mac_function(method: str, mak: bytes) -> MacFn:
    """The MAC of a terminal's messages under its MAK: UnionPay POS "ECB" (DES with
    a single-length MAK, 3DES with a double-length one) or ANSI X9.19."""
    if method == "ecb":
        return functools.partial(crypto.mac_cup_ecb, mak)
    if method == "x919":
        return functools.partial(crypto.mac_x919, mak)
    raise ValueError(f"unknown MAC method {method!r}")


def mac_matches(message: Message, mac_fn: MacFn) -> bool:
    if message.mac_data is None or "64" not in message.fields:
        return False
    try:
        expected = bytes.fromhex(message.fields["64"])
        return hmac.compare_digest(mac_fn(message.mac_data), expected)
    except (ValueError, crypto.CryptoError):
        return False


def verified_session(message: Message, auth: TerminalAuth, method: str) -> Session | None:
    """The key set (in use, or pending from a sign-on) whose MAK verifies the message."""
    for session in auth.sessions():
        try:
            mac_fn = mac_function(method, session.mak)
        except ValueError:
            return None
        if mac_matches(message, mac_fn):
            return session
    return None


def track_matches(request: Fields, session: Session | None) -> bool:
    """Track 2 must carry the card number of field 2 (decrypted first under 004 keys)."""
    track = request["35"]
    if session is not None and session.tdk is not None:
        try:
            track = crypto.decrypt_track(session.tdk, track)
        except crypto.CryptoError:
            return False
    return crypto.track2_pan(track) == request.get("2")


def clear_pin(request: Fields, session: Session | None) -> str | None:
    """The clear PIN from field 52: None when absent (not counted as a try), "" when
    it does not decrypt to a format 0 block (counted as a wrong PIN)."""
    if "52" not in request or session is None:
        return None
    try:
        return crypto.decrypt_pin_block(session.pik, bytes.fromhex(request["52"]), request["2"])
    except (crypto.CryptoError, ValueError):
        return ""
