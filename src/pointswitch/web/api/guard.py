"""Who may call the merchant side of the API: the request signature (HMAC-SHA256
under the terminal's API key), its time window, replays, and rates.

The string signed is, joined by newlines::

    METHOD
    PATH (with the query string, as sent)
    X-Timestamp (Unix seconds)
    Idempotency-Key ("" when there is none)
    SHA-256 of the body, hex

The Idempotency-Key is signed so that a captured request cannot be replayed under
a fresh key: a replay of a signed write is then exactly an idempotent retry (the
ledger answers it from its log). A replayed signature of a request without one
(an inquiry) is refused within the window; outside it, every request is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable


def string_to_sign(method: str, path: str, timestamp: str, idempotency_key: str, body: bytes) -> bytes:
    return "\n".join((method.upper(), path, timestamp, idempotency_key, hashlib.sha256(body).hexdigest())).encode()


def sign(key: bytes, method: str, path: str, timestamp: str, idempotency_key: str, body: bytes) -> str:
    """The X-Signature of a request (what a client computes; docs/api.md has the recipe)."""
    return hmac.new(key, string_to_sign(method, path, timestamp, idempotency_key, body), hashlib.sha256).hexdigest()


class TokenBuckets:
    """Requests per second per client (an API key, a member's address), with bursts;
    at most ``max_clients`` tracked (the least recently seen forgotten first)."""

    def __init__(self, rate_per_s: float, burst: float, max_clients: int,
                 clock: Callable[[], float] = time.monotonic):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str) -> bool:
        now = self._clock()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        allowed = tokens >= 1
        self._buckets[client] = (tokens - 1 if allowed else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return allowed


class ReplayGuard:
    """Signatures seen within the window (non-idempotent requests only)."""

    def __init__(self, window_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_use(self, signature: str) -> bool | None:
        """True the first time, False for a replay, None when full (refuse: too busy)."""
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) <= now:
            self._seen.popitem(last=False)
        if signature in self._seen:
            return False
        if len(self._seen) >= self.max_entries:
            return None
        # Remembered for twice the window: a timestamp may be up to one window in the future.
        self._seen[signature] = now + 2 * self.window_s
        return True


class KeyCache:
    """API keys in memory for ``ttl_s`` (a rotated key stops working within it)."""

    def __init__(self, load: Callable[[str], Awaitable[bytes | None]], ttl_s: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic):
        self._load = load
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._keys: OrderedDict[str, tuple[bytes | None, float]] = OrderedDict()

    async def get(self, terminal_id: str) -> bytes | None:
        now = self._clock()
        cached = self._keys.get(terminal_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        key = await self._load(terminal_id)
        self._keys.pop(terminal_id, None)
        self._keys[terminal_id] = (key, now + self.ttl_s)
        while len(self._keys) > self.max_entries:
            self._keys.popitem(last=False)
        return key


def timestamp_fresh(timestamp: str, window_s: float, now: float | None = None) -> bool:
    if not re.fullmatch(r"[0-9]{1,12}", timestamp):
        return False
    now = time.time() if now is None else now
    return abs(now - int(timestamp)) <= window_s


def signature_matches(key: bytes, signature: str, method: str, path: str, timestamp: str, idempotency_key: str,
                      body: bytes) -> bool:
    expected = sign(key, method, path, timestamp, idempotency_key, body)
    return hmac.compare_digest(expected, signature.lower())
