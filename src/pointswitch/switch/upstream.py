"""Upstream connectors: persistent ISO 8583 client connections to other institutions' hosts.

A :class:`Connector` keeps ``connections`` TCP links open to one host, shares
them among all requests, and matches each response to its request by a key
(default response MTI + field 11 + field 41; or response MTI + field 37), so
many requests can be outstanding on one link. Idle links are kept alive with
network-management echo (0800, field 70 = 301); an unanswered echo or a
broken stream drops the link, which is re-established with exponential
backoff. A response that arrives after its request gave up matches nothing:
it is logged and handed to ``on_late`` (the forwarder answers a late approval
with the reversal it already holds).

Outcomes of :meth:`Connector.request`:
- a response's fields;
- :class:`UpstreamUnavailable`: not sent (no link up, or too many in flight);
- :class:`UpstreamTimeout`: sent, no answer within the deadline;
- :class:`UpstreamLost`: sent, and the link broke before the answer came.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from ..codecs import DecodeFailure, EncodeFailure, Fields, FrameDecoder, FramingError, dialect, framing
from ..config import ConnectorConfig
from ..logs import masked_fields
from ..routing.legs import UpstreamError, UpstreamLost, UpstreamTimeout, UpstreamUnavailable, transmission_time
from ..routing.table import response_mti

__all__ = ["Connector", "UpstreamError", "UpstreamLost", "UpstreamTimeout", "UpstreamUnavailable"]

log = structlog.get_logger("pointswitch.upstream")


class _Link:
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
                    asyncio.open_connection(cfg.host, cfg.port), cfg.connect_timeout_s
                )
            except (OSError, TimeoutError) as exc:
                self.connector._note_failure(self.index, f"connect: {exc or type(exc).__name__}")
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, cfg.backoff_max_s)
                continue
            delay = cfg.backoff_initial_s
            self.writer, self.connected_since, self.last_received = writer, time.time(), time.monotonic()
            log.info("upstream link up", connector=cfg.name, link=self.index, host=cfg.host, port=cfg.port)
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
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                self.connector._link_down(self)
            await asyncio.sleep(cfg.backoff_initial_s * random.uniform(0.8, 1.2))

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

    async def write(self, payload: bytes) -> None:
        writer = self.writer
        if writer is None or writer.is_closing():
            raise UpstreamUnavailable("link down")
        async with self._write_lock:
            writer.write(self.connector.framing.frame(payload))
            await writer.drain()

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
                if self.writer is not None:
                    self.writer.close()
                return
            if reply.get("39") == "00":
                self.last_echo_ok = time.time()
            self.last_received = time.monotonic()


class Connector:
    """Persistent, shared, multiplexed connections to one upstream host."""

    def __init__(self, cfg: ConnectorConfig,
                 on_late: Callable[[Connector, Fields], Awaitable[None]] | None = None):
        self.cfg = cfg
        self.name = cfg.name
        self.dialect = dialect(cfg.dialect)
        self.framing = framing(cfg.framing)
        self.on_late = on_late
        self._links = [_Link(self, i) for i in range(cfg.connections)]
        self._tasks: list[asyncio.Task[None]] = []
        self._waiting: dict[tuple[str, ...], tuple[asyncio.Future[Fields], _Link]] = {}
        self._stan = itertools.count(random.randrange(1, 999_999))
        self._last_error = ""
        self.sent = self.answered = self.timeouts = self.late = 0
        self.became_available = asyncio.Event()

    # -- life cycle --------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(link.run(), name=f"upstream-{self.name}-{link.index}")
                       for link in self._links]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def wait_available(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not self.available:
                    self.became_available.clear()
                    await self.became_available.wait()
        return self.available

    @property
    def response_timeout_s(self) -> float:
        return self.cfg.response_timeout_s

    @property
    def acquirer_id(self) -> str:
        return self.cfg.acquirer_id

    # -- state ---------------------------------------------------------------
    @property
    def available(self) -> bool:
        return any(link.up for link in self._links)

    def state(self) -> dict[str, Any]:
        echoes = [link.last_echo_ok for link in self._links if link.last_echo_ok]
        return {
            "name": self.name, "host": self.cfg.host, "port": self.cfg.port,
            "links_up": sum(link.up for link in self._links), "links": len(self._links),
            "in_flight": len(self._waiting), "sent": self.sent, "answered": self.answered,
            "timeouts": self.timeouts, "late": self.late,
            "last_echo_ok": datetime.fromtimestamp(max(echoes), UTC).isoformat(timespec="seconds") if echoes else None,
            "last_error": self._last_error,
        }

    def _note_failure(self, index: int, error: str) -> None:
        if error != self._last_error:
            log.warning("upstream connect failed", connector=self.name, link=index, error=error)
        self._last_error = error

    def _link_down(self, link: _Link) -> None:
        for key in [k for k, (_, owner) in self._waiting.items() if owner is link]:
            fut, _ = self._waiting.pop(key)
            if not fut.done():
                fut.set_exception(UpstreamLost("link broke before the answer came"))

    # -- messages ----------------------------------------------------------------
    def next_stan(self) -> str:
        return f"{next(self._stan) % 999_999 + 1:06d}"

    def echo_message(self) -> Fields:
        return {"t": "0800", "7": transmission_time(), "11": self.next_stan(), "70": "301"}

    def match_key(self, mti: str, fields: Fields) -> tuple[str, ...]:
        if mti.startswith("08"):  # network management carries no 41 or 37
            return (mti, fields.get("11", ""))
        if self.cfg.match_key == "37":
            return (mti, fields.get("37", "").strip())
        return (mti, fields.get("11", ""), fields.get("41", "").strip())

    async def request(self, fields: Fields, *, timeout_s: float | None = None, link: _Link | None = None) -> Fields:
        """Send one request and wait for its own response."""
        if len(self._waiting) >= self.cfg.max_in_flight:
            raise UpstreamUnavailable("too many requests in flight")
        if link is None:
            up = [lk for lk in self._links if lk.up]
            if not up:
                raise UpstreamUnavailable("no link up")
            link = min(up, key=lambda lk: len(lk.pending))
        expected = response_mti(fields["t"])
        if expected is None:
            raise UpstreamUnavailable(f"{fields['t']} is not a request")
        key = self.match_key(expected, fields)
        if key in self._waiting:
            raise UpstreamUnavailable(f"a request with key {key[1:]} is already outstanding")
        try:
            payload = self.dialect.encode(fields)
        except EncodeFailure as exc:
            raise UpstreamUnavailable(f"cannot encode: {exc}") from None
        fut: asyncio.Future[Fields] = asyncio.get_running_loop().create_future()
        self._waiting[key] = (fut, link)
        link.pending.add(key)
        try:
            await link.write(payload)
            self.sent += 1
            try:
                async with asyncio.timeout(timeout_s or self.cfg.response_timeout_s):
                    reply = await fut
            except TimeoutError:
                self.timeouts += 1
                raise UpstreamTimeout(f"no answer in {timeout_s or self.cfg.response_timeout_s} s") from None
            self.answered += 1
            return reply
        except (OSError, RuntimeError) as exc:
            raise UpstreamLost(str(exc)) from None
        finally:
            self._waiting.pop(key, None)
            link.pending.discard(key)

    async def _received(self, link: _Link, frame: bytes) -> None:
        try:
            fields = self.dialect.decode(frame).fields
        except DecodeFailure as exc:
            log.warning("undecodable frame from upstream", connector=self.name, reason=str(exc))
            return
        mti = fields.get("t", "")
        if mti in ("0800", "0820"):  # the host's own echo / sign-on: answer it (0810 / 0830)
            reply: Fields = {k: fields[k] for k in ("7", "11", "70") if k in fields}
            reply.update({"t": response_mti(mti) or "0810", "39": "00"})
            with contextlib.suppress(UpstreamError, EncodeFailure):
                await link.write(self.dialect.encode(reply))
            return
        waiting = self._waiting.get(self.match_key(mti, fields))
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(fields)
            return
        self.late += 1
        log.warning("upstream response matches no outstanding request (late or unknown)",
                    connector=self.name, mti=mti, iso=masked_fields(fields))
        if self.on_late is not None:
            try:
                await self.on_late(self, fields)
            except Exception:
                log.exception("handling a late upstream response failed", connector=self.name)

    def _became_up(self) -> None:
        self.became_available.set()
