"""Session cookies and form tokens of the console: pure functions over one key.

A session is a signed cookie, ``payload.signature`` (both base64url): the payload
names the operator, the operator's session generation, when the session ends and
a random session nonce; the signature is HMAC-SHA256 under a key derived from the
vault's ``console_session`` data key, so the server keeps no session table and a
cookie cannot be forged or altered. The generation lets the server end sessions
(logout, new password, new role, disabled): a cookie of an older one is refused.

A form token (CSRF) is an HMAC of the session nonce: a page of another site can
neither read it nor compute it. Before sign-in, the login form's token is an
HMAC of a random nonce in a short-lived pre-session cookie (double submit).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

SESSION_COOKIE = "ps_session"
LOGIN_COOKIE = "ps_login"
LOGIN_COOKIE_TTL_S = 1800  # a login form left open longer than this is served again
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_MAX_COOKIE_CHARS = 512


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    operator_id: int
    generation: int
    expires_at: float  # Unix time
    nonce: str


class Keys:
    """The console's keys, derived from the vault's ``console_session`` data key, one per use."""

    def __init__(self, data_key: bytes):
        self._session = hmac.new(data_key, b"pointswitch console session", hashlib.sha256).digest()
        self._csrf = hmac.new(data_key, b"pointswitch console form token", hashlib.sha256).digest()

    # -- sessions -------------------------------------------------------------------
    def issue(self, operator_id: int, generation: int, expires_at: float) -> str:
        payload = _b64(json.dumps({"o": operator_id, "g": generation, "e": int(expires_at),
                                   "n": secrets.token_urlsafe(16)}, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}"

    def session(self, cookie: str | None, now: float) -> Session | None:
        """The session a cookie carries, if its signature holds and it has not expired."""
        if not cookie or len(cookie) > _MAX_COOKIE_CHARS or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(int(data["o"]), int(data["g"]), float(data["e"]), str(data["n"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires_at > now else None

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._session, payload.encode(), hashlib.sha256).digest())

    # -- form tokens ------------------------------------------------------------------
    def form_token(self, nonce: str) -> str:
        return _b64(hmac.new(self._csrf, nonce.encode(), hashlib.sha256).digest())

    def token_valid(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or not token or len(token) > 64:
            return False
        return hmac.compare_digest(token, self.form_token(nonce))


def new_nonce() -> str:
    return secrets.token_urlsafe(24)
