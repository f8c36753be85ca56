"""One frame in, at most one frame out: decode, route, encode, log.

No sockets here; :mod:`server` feeds it frames. Kept separate so the whole
request path can be exercised with bytes alone.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from .. import logs
from ..codecs import DecodeFailure, Dialect, EncodeFailure
from ..logs import mask_pan, masked_fields
from ..routing import ListenerPolicy, Origin, Response, Router, codes, error_response

log = structlog.get_logger("pointswitch.switch")


@dataclass
class Answer:
    payload: bytes | None  # None: nothing can be answered
    answerable: bool = True  # False when the frame could not be read far enough to answer
    authenticated: bool = False  # the request's MAC verified


def peer_address(peer: str) -> str:
    """The address part of "address:port"."""
    return peer.rpartition(":")[0] if ":" in peer else peer


class FrameHandler:
    def __init__(self, policy: ListenerPolicy, dialect: Dialect, router: Router, request_timeout_s: float):
        self.policy = policy
        self.listener = policy.name
        self.dialect = dialect
        self.router = router
        self.request_timeout_s = request_timeout_s

    def overloaded(self, frame: bytes, peer: str = "") -> Answer:
        """The answer when too many requests are in progress: 96 at once, nothing routed."""
        started = time.perf_counter()
        try:
            message = self.dialect.decode(frame)
        except DecodeFailure:
            return Answer(None, answerable=False)
        response = error_response(message.fields, codes.SYSTEM_MALFUNCTION)
        self._log(message.fields, response, started, peer, op="overloaded")
        if response is None:
            return Answer(None, answerable=False)
        return Answer(self._encode(response, message.envelope))

    async def handle(self, frame: bytes, peer: str = "") -> Answer:
        started = time.perf_counter()
        try:
            message = self.dialect.decode(frame)
        except DecodeFailure as failure:
            response = error_response(failure.fields, codes.FORMAT_ERROR) if "t" in failure.fields else None
            self._log(failure.fields, response, started, peer, op="undecodable",
                      reason=failure.reason, field=failure.field_number, frame_bytes=len(frame))
            if response is None:
                return Answer(None, answerable=False)
            return Answer(self._encode(response, failure.envelope))
        fields = message.fields
        if logs.debug_enabled:
            log.debug("request", listener=self.listener, peer=peer, iso=masked_fields(fields))
        try:
            async with asyncio.timeout(self.request_timeout_s):
                response = await self.router.handle(message, Origin(self.policy, peer_address(peer)))
        except TimeoutError:
            response = error_response(fields, codes.SYSTEM_MALFUNCTION)
            log.error("request timed out", listener=self.listener, timeout_s=self.request_timeout_s)
        except Exception:
            log.exception("request failed", listener=self.listener, mti=fields.get("t"))
            response = error_response(fields, codes.SYSTEM_MALFUNCTION)
        self._log(fields, response, started, peer, op=response.op if response else "")
        if response is not None and logs.debug_enabled:
            log.debug("response", listener=self.listener, peer=peer, iso=masked_fields(response.fields))
        if response is None:
            return Answer(None, answerable=False)
        return Answer(self._encode(response, message.envelope), authenticated=response.authenticated)

    def _encode(self, response: Response, envelope: object) -> bytes | None:
        reply = getattr(envelope, "reply", None)
        env = reply(response.processing_requirement) if reply else envelope
        try:
            return self.dialect.encode(response.fields, env, sign=response.sign)
        except EncodeFailure as exc:
            log.error("response does not encode", listener=self.listener, error=mask_pan(str(exc)))
            fallback = {k: v for k, v in response.fields.items() if k in ("t", "3", "11", "41", "42")}
            fallback["39"] = codes.SYSTEM_MALFUNCTION
            try:
                return self.dialect.encode(fallback, env)
            except EncodeFailure:
                return None

    def _log(self, request: dict[str, str], response: Response | None, started: float, peer: str,
             **extra: object) -> None:
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        rc = response.fields.get("39") if response else None
        event = "transaction" if rc in ("00", None) else "transaction declined"
        log.info(
            event,
            listener=self.listener,
            peer=peer,
            mti=request.get("t"),
            terminal=request.get("41", "").rstrip(),
            trace=request.get("11"),
            card=mask_pan(request.get("2", "")) if "2" in request else None,
            rc=rc,
            latency_ms=latency_ms,
            **extra,
        )
