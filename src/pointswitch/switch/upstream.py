"""Upstream connectors: persistent ISO 8583 client connections to other institutions' hosts.

A :class:`Connector` keeps ``connections`` links (TCP, or TLS when configured)
open to one host, shares them among all requests, and finds each response's
request by a key (default response MTI + field 11 + field 41; or response MTI
+ field 37), so many requests can be outstanding on one link. A response found
by its key is accepted only when it also echoes the request's 2 (when sent), 4,
11, 37 and 41 and, with a MAC key, carries a valid MAC; otherwise it is logged
as mismatched and the request keeps waiting (and times out as usual). Idle
links are kept alive with network-management echo (0800, field 70 = 301); an
unanswered echo, a stalled write or a broken stream drops the link, which is
re-established with exponential backoff (``upstream_link``). A response that
arrives after its request gave up matches nothing: it is logged and handed to
``on_late`` (the forwarder answers a late approval with the reversal it holds).

The trace (11) and retrieval reference (37) of each request come from
``identities``, a source of numbers unique across processes and restarts
(``ledger.identity``, injected by the application): this module has no SQL.

Outcomes of :meth:`Connector.request`:
- the response's fields;
- :class:`UpstreamUnavailable`: not sent (no link up, too many in flight, no turn to write);
- :class:`UpstreamTimeout`: sent, no acceptable answer within the deadline;
- :class:`UpstreamLost`: sent, or possibly sent, and the link broke before the answer came.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from ..codecs import DecodeFailure, EncodeFailure, Fields, Message, dialect, framing
from ..config import ConnectorConfig
from ..logs import masked_fields
from ..routing.legs import (
    LegIdentity,
    UpstreamError,
    UpstreamLost,
    UpstreamTimeout,
    UpstreamUnavailable,
    leg_identity,
    transmission_time,
)
from ..routing.table import response_mti
from .upstream_link import Link
from .upstream_wire import SIGNED_REQUESTS, Signer, echo_mismatches, read_mac_key, tls_context, tls_server_name

__all__ = ["Connector", "UpstreamError", "UpstreamLost", "UpstreamTimeout", "UpstreamUnavailable"]

log = structlog.get_logger("pointswitch.upstream")


@dataclass
class _Waiting:
    future: asyncio.Future[Fields]
    link: Link
    request: Fields


class Connector:
    """Persistent, shared, multiplexed connections to one upstream host."""

    def __init__(self, cfg: ConnectorConfig,
                 on_late: Callable[[Connector, Fields], Awaitable[None]] | None = None, *,
                 identities: Callable[[], Awaitable[int]]):
        self.cfg = cfg
        self.name = cfg.name
        self.dialect = dialect(cfg.dialect)
        self.framing = framing(cfg.framing)
        self.on_late = on_late
        self.tls = tls_context(cfg)
        self.tls_server_name = tls_server_name(cfg)
        self._signer = Signer(read_mac_key(cfg.mac_key_file, f"connector {cfg.name}"), self.dialect) \
            if cfg.mac_key_file else None
        self._identities = identities
        self._links = [Link(self, i) for i in range(cfg.connections)]
        self._tasks: list[asyncio.Task[None]] = []
        self._waiting: dict[tuple[str, ...], _Waiting] = {}
        # Echoes only: an 0810 is found by 0810 + 11 on this connector's own links.
        self._echo_stan = itertools.count(random.randrange(1, 999_999))
        # The last connect failure, while it is news: cleared when a link comes up.
        self._last_error = ""
        self._last_error_at: float | None = None
        self.sent = self.answered = self.timeouts = self.late = self.mismatched = self.write_timeouts = 0
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
            "name": self.name, "host": self.cfg.host, "port": self.cfg.port, "tls": self.cfg.tls,
            "mac": self._signer is not None,
            "links_up": sum(link.up for link in self._links), "links": len(self._links),
            "in_flight": len(self._waiting), "sent": self.sent, "answered": self.answered,
            "timeouts": self.timeouts, "late": self.late, "mismatched": self.mismatched,
            "write_timeouts": self.write_timeouts,
            "last_echo_ok": _iso(max(echoes)) if echoes else None,
            "last_error": self._last_error,
            "last_error_at": _iso(self._last_error_at),
        }

    def _note_failure(self, index: int, error: str) -> None:
        if error != self._last_error:
            log.warning("upstream connect failed", connector=self.name, link=index, error=error)
        self._last_error, self._last_error_at = error, time.time()

    def _link_down(self, link: Link) -> None:
        for key in [k for k, w in self._waiting.items() if w.link is link]:
            waiting = self._waiting.pop(key)
            if not waiting.future.done():
                waiting.future.set_exception(UpstreamLost("link broke before the answer came"))

    def _became_up(self) -> None:
        """A link is up: the failure that kept it down is history (the log has it)."""
        self._last_error, self._last_error_at = "", None
        self.became_available.set()

    # -- messages ----------------------------------------------------------------
    async def next_stan(self) -> LegIdentity:
        """Trace (11) and retrieval reference (37) for a new request: never used before
        by any process on this database (see ``routing.legs.leg_identity``)."""
        return leg_identity(await self._identities())

    def echo_message(self) -> Fields:
        return {"t": "0800", "7": transmission_time(), "11": f"{next(self._echo_stan) % 999_999 + 1:06d}",
                "70": "301"}

    def match_key(self, mti: str, fields: Fields) -> tuple[str, ...]:
        if mti.startswith("08"):  # network management carries no 41 or 37
            return (mti, fields.get("11", ""))
        if self.cfg.match_key == "37":
            return (mti, fields.get("37", "").strip())
        return (mti, fields.get("11", ""), fields.get("41", "").strip())

    def _encode(self, fields: Fields) -> bytes:
        if self._signer is not None and fields["t"] in SIGNED_REQUESTS:
            return self._signer.encode(fields)
        return self.dialect.encode(fields)

    async def request(self, fields: Fields, *, timeout_s: float | None = None, link: Link | None = None) -> Fields:
        """Send one request and wait for its own response, ``timeout_s`` (default
        ``response_timeout_s``) in all, the write included."""
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
            payload = self._encode(fields)
        except EncodeFailure as exc:
            raise UpstreamUnavailable(f"cannot encode: {exc}") from None
        total_s = timeout_s or self.cfg.response_timeout_s
        deadline = asyncio.get_running_loop().time() + total_s
        fut: asyncio.Future[Fields] = asyncio.get_running_loop().create_future()
        self._waiting[key] = _Waiting(fut, link, fields)
        link.pending.add(key)
        try:
            await link.write(payload, timeout_s=total_s)
            self.sent += 1
            try:
                async with asyncio.timeout_at(deadline):
                    reply = await fut
            except TimeoutError:
                self.timeouts += 1
                raise UpstreamTimeout(f"no answer in {total_s} s") from None
            self.answered += 1
            return reply
        except (OSError, RuntimeError) as exc:
            raise UpstreamLost(str(exc)) from None
        finally:
            self._waiting.pop(key, None)
            link.pending.discard(key)
            if fut.done() and not fut.cancelled():
                fut.exception()  # a link that broke while this was being written failed it too: seen

    async def _received(self, link: Link, frame: bytes) -> None:
        try:
            message = self.dialect.decode(frame)
        except DecodeFailure as exc:
            log.warning("undecodable frame from upstream", connector=self.name, reason=str(exc))
            return
        fields = message.fields
        mti = fields.get("t", "")
        if mti in ("0800", "0820"):  # the host's own echo / sign-on: answer it (0810 / 0830)
            reply: Fields = {k: fields[k] for k in ("7", "11", "70") if k in fields}
            reply.update({"t": response_mti(mti) or "0810", "39": "00"})
            with contextlib.suppress(UpstreamError, EncodeFailure):
                await link.write(self.dialect.encode(reply))
            return
        waiting = self._waiting.get(self.match_key(mti, fields))
        if waiting is not None and not waiting.future.done():
            problem = self._not_its_answer(waiting.request, message, frame)
            if problem is None:
                waiting.future.set_result(fields)
                return
            self.mismatched += 1
            log.warning("upstream response does not answer its request: ignored", connector=self.name,
                        mti=mti, problem=problem, iso=masked_fields(fields))
            return
        self.late += 1
        log.warning("upstream response matches no outstanding request (late or unknown)",
                    connector=self.name, mti=mti, iso=masked_fields(fields))
        if self.on_late is not None:
            try:
                await self.on_late(self, fields)
            except Exception:
                log.exception("handling a late upstream response failed", connector=self.name)

    def _not_its_answer(self, request: Fields, message: Message, frame: bytes) -> str | None:
        """Why a response found by its key is not ``request``'s answer, or None when it is.
        Network management (echo) is matched by its key alone."""
        if request["t"].startswith("08"):
            return None
        differ = echo_mismatches(request, message.fields)
        if differ:
            return "does not echo field " + ", ".join(differ)
        if self._signer is not None and request["t"] in SIGNED_REQUESTS and not self._signer.verify(message, frame):
            return "MAC missing or wrong"
        return None


def _iso(at: float | None) -> str | None:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") if at is not None else None
