"""One persistent connection of a connector: connect (TLS when configured), read
frames, write with a deadline, keep alive with echoes, reconnect with backoff.

A write that the link does not take within its deadline breaks the link. What
the caller learns depends on whether any of its bytes may have left: if the
write never got its turn (another write held the link), nothing left and it is
:class:`UpstreamUnavailable`; once its bytes were handed to the transport they
may be at the host, so it is :class:`UpstreamLost` (treated as sent: reversed).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from typing import TYPE_CHECKING

import structlog

from ..codecs import FrameDecoder, FramingError
from ..routing.legs import UpstreamError, UpstreamLost, UpstreamUnavailable

if TYPE_CHECKING:
    from .upstream import Connector

log = structlog.get_logger("pointswitch.upstream")


class Link:
    """One persistent connection of a connector."""

    def __init__(self, connector: Connector, index: int):
        self.connector = connector
        self.index = index
        self.writer: asyncio.StreamWriter | None = None
        self.pending: set[tuple[str, ...]] = set()
        self.last_received = 0.0
        self.last_echo_ok: float | None = None
        self.connected_since: float | None = None
        self._write_lock = asyncio.Lock()

    @property
    def up(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    async def run(self) -> None:
        cfg = self.connector.cfg
        delay = cfg.backoff_initial_s
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(cfg.host, cfg.port, ssl=self.connector.tls,
                                            server_hostname=self.connector.tls_server_name),
                    cfg.connect_timeout_s,
                )
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError: a refused certificate
                self.connector._note_failure(self.index, f"connect: {exc or type(exc).__name__}")
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, cfg.backoff_max_s)
                continue
            delay = cfg.backoff_initial_s
            self._bound_buffers(writer)
            self.writer, self.connected_since, self.last_received = writer, time.time(), time.monotonic()
            log.info("upstream link up", connector=cfg.name, link=self.index, host=cfg.host, port=cfg.port,
                     tls=cfg.tls)
            self.connector._became_up()
            echo = asyncio.create_task(self._keepalive())
            try:
                await self._read(reader)
            except (OSError, FramingError, asyncio.IncompleteReadError) as exc:
                log.warning("upstream link broken", connector=cfg.name, link=self.index, error=str(exc))
            finally:
                echo.cancel()
                self.writer = None
                self.connected_since = None
                await self._close(writer)
                self.connector._link_down(self)
            await asyncio.sleep(cfg.backoff_initial_s * random.uniform(0.8, 1.2))

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close, letting unsent bytes go for at most ``write_timeout_s``: a graceful close
        waits for them, and a host that does not read would hold the link (and the
        switch's shutdown) for ever."""
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.connector.cfg.write_timeout_s):
                await writer.wait_closed()
        writer.transport.abort()  # nothing left to lose: no-op when closed already

    def _bound_buffers(self, writer: asyncio.StreamWriter) -> None:
        """At most ``send_buffer_bytes`` waiting in the kernel and as much again in the
        transport: past that writes wait, and a host that stops reading is noticed
        after that many bytes instead of after the operating system's megabytes."""
        limit = self.connector.cfg.send_buffer_bytes
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit)
        writer.transport.set_write_buffer_limits(high=limit)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        cfg = self.connector.cfg
        decoder = FrameDecoder(self.connector.framing, cfg.max_frame_bytes)
        while True:
            data = await reader.read(65536)
            if not data:
                raise OSError("closed by the host")
            self.last_received = time.monotonic()
            for frame in decoder.feed(data):
                await self.connector._received(self, frame)

    async def write(self, payload: bytes, timeout_s: float | None = None) -> None:
        """Frame and send ``payload``; within ``timeout_s`` (default ``write_timeout_s``)
        or the link is broken (see the module's docstring for what the caller gets)."""
        writer = self.writer
        if writer is None or writer.is_closing():
            raise UpstreamUnavailable("link down")
        limit_s = min(timeout_s or self.connector.cfg.write_timeout_s, self.connector.cfg.write_timeout_s)
        handed_over = False
        try:
            async with asyncio.timeout(limit_s):
                async with self._write_lock:
                    if writer.is_closing():
                        raise UpstreamUnavailable("link down")
                    writer.write(self.connector.framing.frame(payload))
                    handed_over = True
                    await writer.drain()
        except TimeoutError:
            self.connector.write_timeouts += 1
            log.warning("upstream write stalled: dropping the link", connector=self.connector.name,
                        link=self.index, timeout_s=limit_s, may_have_left=handed_over)
            writer.transport.abort()  # the reader sees the end and fails what waits on this link
            if handed_over:
                raise UpstreamLost(f"write not taken in {limit_s} s") from None
            raise UpstreamUnavailable(f"no turn to write in {limit_s} s") from None

    async def _keepalive(self) -> None:
        cfg = self.connector.cfg
        while True:
            idle = time.monotonic() - self.last_received
            if idle < cfg.echo_interval_s:
                await asyncio.sleep(cfg.echo_interval_s - idle)
                continue
            try:
                reply = await self.connector.request(self.connector.echo_message(), link=self,
                                                     timeout_s=cfg.echo_timeout_s)
            except UpstreamError as exc:
                log.warning("upstream echo failed: dropping the link", connector=cfg.name, link=self.index,
                            error=type(exc).__name__)
                if self.writer is not None:  # abort: a close would wait for a host that may not read
                    self.writer.transport.abort()
                return
            if reply.get("39") == "00":
                self.last_echo_ok = time.time()
            self.last_received = time.monotonic()
