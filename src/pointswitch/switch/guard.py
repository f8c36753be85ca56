"""Per-peer accounting: what one address may do before it is refused.

- connections per peer (``max_connections_per_peer``);
- sign-ons per terminal and peer, and per peer (token buckets per minute);
- MAC failures in a sliding window: past the per-peer limit the peer is banned
  for ``peer_ban_s`` (its connections are closed, new ones refused); past the
  per-terminal limit, whoever sent them, the terminal's keys are withdrawn, so an
  online search for a 32-bit MAC never gets far under one key;
- batch settlement and upload, which carry no MAC: accepted without one only from
  the address the terminal last sent a MAC-verified message from (remembered here,
  so per process: a settlement reaching another process than the terminal's last
  transaction is refused unless it carries a MAC), and settlements per terminal
  limited (a token bucket per minute).

A peer is an address without its port. All state is bounded (LRU), so random
terminal ids or many addresses cost memory only up to ``max_tracked``. Counters
are per process: with N workers an attacker gets N times the allowance.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TypeVar

import structlog

from ..config import Limits, SecurityConfig
from ..ledger.model import Status
from . import metrics

log = structlog.get_logger("pointswitch.switch")

K = TypeVar("K")
V = TypeVar("V")


class _Bounded(OrderedDict[K, V]):
    """An LRU dict that forgets its oldest entries past ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def touch(self, key: K, default: Callable[[], V]) -> V:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = default()
        while len(self) > self.limit:
            self.popitem(last=False)
        return value


class _Bucket:
    """A token bucket: ``per_minute`` tokens a minute, as many in a burst."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, per_minute: int, now: float):
        self.tokens, self.stamp = float(per_minute), now

    def take(self, per_minute: int, now: float) -> bool:
        self.tokens = min(float(per_minute), self.tokens + (now - self.stamp) * per_minute / 60.0)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class PeerGuard:
    def __init__(self, security: SecurityConfig, limits: Limits, *, max_tracked: int = 65_536,
                 clock: Callable[[], float] = time.monotonic):
        self.security = security
        self.limits = limits
        self.clock = clock
        self.connections: dict[str, int] = {}
        self.banned_until: _Bounded[str, float] = _Bounded(max_tracked)
        self._sign_on_pairs: _Bounded[tuple[str, str], _Bucket] = _Bounded(max_tracked)
        self._sign_on_peers: _Bounded[str, _Bucket] = _Bounded(max_tracked)
        self._peer_failures: _Bounded[str, deque[float]] = _Bounded(max_tracked)
        self._terminal_failures: _Bounded[str, deque[float]] = _Bounded(max_tracked)
        self._verified_peers: _Bounded[str, str] = _Bounded(max_tracked)  # terminal -> its last authenticated peer
        self._settlements: _Bounded[str, _Bucket] = _Bounded(max_tracked)
        self.on_ban: Callable[[str], None] = lambda _peer: None  # the switch closes the peer's connections

    # -- connections ---------------------------------------------------------------
    def refuse_connection(self, peer: str) -> str | None:
        """Why a new connection from ``peer`` is refused, or None."""
        if self.banned(peer):
            return "banned"
        if self.connections.get(peer, 0) >= self.limits.max_connections_per_peer:
            return "peer_limit"
        return None

    def opened(self, peer: str) -> None:
        self.connections[peer] = self.connections.get(peer, 0) + 1

    def closed(self, peer: str) -> None:
        left = self.connections.get(peer, 0) - 1
        if left > 0:
            self.connections[peer] = left
        else:
            self.connections.pop(peer, None)

    def banned(self, peer: str) -> bool:
        until = self.banned_until.get(peer)
        if until is None:
            return False
        if self.clock() >= until:
            del self.banned_until[peer]
            return False
        return True

    # -- sign-on -------------------------------------------------------------------
    def sign_on_allowed(self, terminal_id: str, peer: str) -> bool:
        now, cfg = self.clock(), self.security
        pair = self._sign_on_pairs.touch((terminal_id, peer), lambda: _Bucket(cfg.sign_ons_per_minute, now))
        per_peer = self._sign_on_peers.touch(peer, lambda: _Bucket(cfg.sign_ons_per_minute_per_peer, now))
        allowed = pair.take(cfg.sign_ons_per_minute, now) and per_peer.take(cfg.sign_ons_per_minute_per_peer, now)
        if not allowed:
            metrics.SIGN_ONS_REFUSED.inc()
        return allowed

    # -- MAC failures ----------------------------------------------------------------
    def mac_failed(self, terminal_id: str, peer: str) -> bool:
        now, cfg = self.clock(), self.security
        if self._count(self._peer_failures, peer, now) >= cfg.max_mac_failures_per_peer:
            self._peer_failures.pop(peer, None)
            self.banned_until[peer] = now + cfg.peer_ban_s
            self.banned_until.move_to_end(peer)
            metrics.PEERS_BANNED.inc()
            log.error("peer refused after repeated MAC failures", peer=peer, ban_s=cfg.peer_ban_s,
                      failures=cfg.max_mac_failures_per_peer)
            self.on_ban(peer)
        if self._count(self._terminal_failures, terminal_id, now) >= cfg.max_mac_failures_per_terminal:
            self._terminal_failures.pop(terminal_id, None)
            metrics.SESSIONS_DROPPED.inc()
            return True
        return False

    def _count(self, windows: _Bounded[str, deque[float]], key: str, now: float) -> int:
        window = windows.touch(key, deque)
        window.append(now)
        while window and window[0] <= now - self.security.mac_failure_window_s:
            window.popleft()
        return len(window)

    # -- batch settlement and upload ---------------------------------------------------
    def verified(self, terminal_id: str, peer: str) -> None:
        self._verified_peers.touch(terminal_id, lambda: peer)
        self._verified_peers[terminal_id] = peer

    def settlement_refusal(self, terminal_id: str, peer: str, *, mac_verified: bool, settles: bool) -> Status | None:
        if not mac_verified and self._verified_peers.get(terminal_id) != peer:
            return Status.UNVERIFIED_PEER
        if settles:
            now, per_minute = self.clock(), SETTLEMENTS_PER_MINUTE
            bucket = self._settlements.touch(terminal_id, lambda: _Bucket(per_minute, now))
            if not bucket.take(per_minute, now):
                return Status.TOO_FREQUENT
        return None


# Settlements (0500) of one terminal a minute: a real terminal settles once a day
# (and retransmits a few times); more is an attack or a fault.
SETTLEMENTS_PER_MINUTE = 6
