"""TCP listeners: one asyncio Protocol per connection, limits, graceful stop.

Requests on one connection are processed concurrently and answered as they
complete. Reading pauses while ``max_in_flight_per_connection`` requests are in
progress, and while the peer has not read ``max_write_buffer_bytes`` of answers
(back-pressure instead of unbounded queues). Past ``max_requests_in_flight``
across all connections a request is answered 96 at once. A connection that has
not yet sent a message whose MAC verified is closed after the short
``unauthenticated_idle_timeout_s``; a peer the guard bans is cut off.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from dataclasses import dataclass

import structlog

from ..codecs import FrameDecoder, FramingError, FramingSpec
from ..config import Limits
from ..ledger import gate
from . import metrics
from .guard import PeerGuard
from .handler import FrameHandler, peer_address

log = structlog.get_logger("pointswitch.switch")


@dataclass
class Listener:
    name: str
    host: str
    port: int
    framing: FramingSpec
    handler: FrameHandler


class Connection(asyncio.Protocol):
    def __init__(self, switch: Switch, listener: Listener):
        self.switch = switch
        self.listener = listener
        self.limits = switch.limits
        self.decoder = FrameDecoder(listener.framing, self.limits.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.peer_address = ""
        self.in_flight = 0
        self.backlog: collections.deque[bytes] = collections.deque()
        self.paused = False  # reading paused: too many requests of this connection in progress
        self.writing_paused = False  # reading paused: the peer does not read its answers
        self.authenticated = False  # a message of this connection carried a MAC that verified
        self.counted = False
        self.gates: set[gate.WriteGate] = set()  # this connection's requests in progress
        self.undecodable_in_a_row = 0
        self._idle: asyncio.TimerHandle | None = None
        self._frame_deadline: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    # -- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        self.peer_address = peer_address(self.peer)
        if len(self.switch.connections) >= self.limits.max_connections:
            log.warning("connection refused: limit reached", listener=self.listener.name, peer=self.peer,
                        max_connections=self.limits.max_connections)
            metrics.CONNECTIONS_REFUSED.labels("limit").inc()
            transport.close()
            return
        refusal = self.switch.guard.refuse_connection(self.peer_address)
        if refusal is not None:
            if refusal == "peer_limit":
                log.warning("connection refused: too many from this peer", listener=self.listener.name,
                            peer=self.peer, max_connections_per_peer=self.limits.max_connections_per_peer)
            metrics.CONNECTIONS_REFUSED.labels(refusal).inc()
            transport.close()
            return
        self.switch.guard.opened(self.peer_address)
        self.counted = True
        self.switch.connections.add(self)
        metrics.CONNECTIONS_OPEN.inc()
        transport.set_write_buffer_limits(high=self.limits.max_write_buffer_bytes)  # type: ignore[attr-defined]
        self._touch()
        log.debug("connection opened", listener=self.listener.name, peer=self.peer)

    def data_received(self, data: bytes) -> None:
        self._touch()
        had_partial = self.decoder.partial
        try:
            frames = self.decoder.feed(data)
        except FramingError as exc:
            log.warning("framing broken, closing", listener=self.listener.name, peer=self.peer, reason=str(exc))
            self._close()
            return
        self._arm_frame_deadline(new_frame_started=bool(frames) or not had_partial)
        self.backlog.extend(frames)
        self._dispatch()

    def connection_lost(self, exc: Exception | None) -> None:
        # Work for a connection that is gone is given up where it has not begun to
        # commit (no answer could reach anyone); what is committing finishes, and a
        # retransmission on another connection gets its stored outcome.
        for write_gate in self.gates:
            write_gate.abandon()
        if self.counted:
            self.counted = False
            self.switch.guard.closed(self.peer_address)
            self.switch.connections.discard(self)
            metrics.CONNECTIONS_OPEN.dec()
        for timer in (self._idle, self._frame_deadline):
            if timer:
                timer.cancel()
        log.debug("connection closed", listener=self.listener.name, peer=self.peer)

    def pause_writing(self) -> None:
        """The peer is not reading its answers: stop reading its requests until it does."""
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()

    # -- work -----------------------------------------------------------------
    def _dispatch(self) -> None:
        while self.backlog and self.in_flight < self.limits.max_in_flight_per_connection:
            frame = self.backlog.popleft()
            if self.switch.in_flight >= self.limits.max_requests_in_flight:
                metrics.OVERLOADED.inc()
                self._write(self.listener.handler.overloaded(frame, self.peer).payload)
                continue
            self.in_flight += 1
            self.switch.in_flight += 1
            metrics.REQUESTS_IN_FLIGHT.inc()
            task = self.loop.create_task(self._process(frame))
            self.switch.tasks.add(task)
            task.add_done_callback(self.switch.tasks.discard)
        self._update_reading()

    def _update_reading(self) -> None:
        should_pause = self.writing_paused or self.in_flight >= self.limits.max_in_flight_per_connection
        if not self.transport or self.transport.is_closing():
            return
        if should_pause and not self.paused:
            self.transport.pause_reading()
            self.paused = True
        elif not should_pause and self.paused:
            self.transport.resume_reading()
            self.paused = False

    def _write(self, payload: bytes | None) -> None:
        if payload is not None and self.transport and not self.transport.is_closing():
            self.transport.write(self.listener.framing.frame(payload))

    async def _process(self, frame: bytes) -> None:
        write_gate = gate.WriteGate()
        self.gates.add(write_gate)
        try:
            answer = await self.listener.handler.handle(frame, self.peer, write_gate)
            if answer.authenticated:
                self.authenticated = True
            if not answer.answerable:
                self.undecodable_in_a_row += 1
                if self.undecodable_in_a_row >= self.limits.max_undecodable_frames:
                    log.warning("too many unanswerable frames, closing", listener=self.listener.name,
                                peer=self.peer, frames=self.undecodable_in_a_row)
                    self._close()
            else:
                self.undecodable_in_a_row = 0
            self._write(answer.payload)
        except Exception:
            log.exception("unexpected failure processing a frame", listener=self.listener.name)
        finally:
            self.gates.discard(write_gate)
            self.in_flight -= 1
            self.switch.in_flight -= 1
            metrics.REQUESTS_IN_FLIGHT.dec()
            self._touch()
            self._dispatch()

    # -- timers ---------------------------------------------------------------
    @property
    def idle_timeout_s(self) -> float:
        if self.authenticated:
            return self.limits.idle_timeout_s
        return min(self.limits.idle_timeout_s, self.limits.unauthenticated_idle_timeout_s)

    def _touch(self) -> None:
        if self._idle:
            self._idle.cancel()
        self._idle = self.loop.call_later(self.idle_timeout_s, self._on_idle)

    def _on_idle(self) -> None:
        if self.in_flight:
            self._touch()
            return
        log.info("idle connection closed", listener=self.listener.name, peer=self.peer,
                 idle_timeout_s=self.idle_timeout_s, authenticated=self.authenticated)
        self._close()

    def _arm_frame_deadline(self, *, new_frame_started: bool) -> None:
        """A frame must complete within frame_timeout_s of its first byte: a slow drip
        of bytes does not extend it, and a client that pipelines (its reads ending in
        the middle of ever new frames) is timed frame by frame, not as one stream."""
        if not self.decoder.partial or new_frame_started:
            if self._frame_deadline:
                self._frame_deadline.cancel()
                self._frame_deadline = None
        if self.decoder.partial and self._frame_deadline is None:
            self._frame_deadline = self.loop.call_later(self.limits.frame_timeout_s, self._on_frame_timeout)

    def _on_frame_timeout(self) -> None:
        log.warning("incomplete frame timed out, closing", listener=self.listener.name, peer=self.peer,
                    frame_timeout_s=self.limits.frame_timeout_s)
        self._close()

    def _close(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.close()


class Switch:
    def __init__(self, listeners: list[Listener], limits: Limits, guard: PeerGuard, *, reuse_port: bool = False):
        self.listeners = listeners
        self.reuse_port = reuse_port  # several worker processes share each port (SO_REUSEPORT)
        self.limits = limits
        self.guard = guard
        guard.on_ban = self.close_peer
        self.in_flight = 0
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.servers: list[asyncio.Server] = []
        self.bound: dict[str, tuple[str, int]] = {}

    def close_peer(self, address: str) -> None:
        """Close every connection from ``address`` (a banned peer)."""
        for conn in [c for c in self.connections if c.peer_address == address]:
            conn._close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for lst in self.listeners:
            server = await loop.create_server(
                functools.partial(Connection, self, lst), lst.host, lst.port, reuse_address=True, backlog=512,
                reuse_port=self.reuse_port or None,
            )
            self.servers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            self.bound[lst.name] = (host, port)
            log.info("listener ready", listener=lst.name, host=host, port=port,
                     dialect=lst.handler.dialect.name, framing=lst.framing.name)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace period), close."""
        for server in self.servers:
            server.close()
        # Requests already on open connections keep arriving for a moment after
        # the signal; wait for all of them, new ones included, up to the grace period.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.shutdown_grace_s
        while pending := {t for t in self.tasks if not t.done()}:
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("requests abandoned at shutdown", count=len(pending))
                for conn in self.connections:  # what has not begun to commit never will
                    for write_gate in conn.gates:
                        write_gate.abandon()
                for t in pending:
                    t.cancel()
                break
            log.info("finishing requests in flight", count=len(pending))
            await asyncio.wait(pending, timeout=remaining)
        for conn in list(self.connections):
            conn._close()
        await asyncio.sleep(0)
