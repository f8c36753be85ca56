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
from ..ledger import gate
from ..logs import mask_pan, masked_fields
from ..routing import ListenerPolicy, Origin, Response, Router, codes, error_response
from ..routing.table import has_request_key
from . import metrics
from .health import DATABASE_ERRORS, DatabaseHealth

log = structlog.get_logger("pointswitch.switch")


@dataclass
class Answer:
    payload: bytes | None  # None: nothing can be answered
    answerable: bool = True  # False when the frame could not be read far enough to answer
    authenticated: bool = False  # the request's MAC verified


class _GivenUp(Exception):
    pass


def _retrieve(work: asyncio.Future[Response | None]) -> None:
    """A request given up at its deadline ends on its own: take its exception so that
    asyncio does not report it as never retrieved."""
    if not work.cancelled():
        work.exception()


def peer_address(peer: str) -> str:
    """The address part of "address:port"."""
    return peer.rpartition(":")[0] if ":" in peer else peer


class FrameHandler:
    def __init__(self, policy: ListenerPolicy, dialect: Dialect, router: Router, request_timeout_s: float, *,
                 commit_wait_s: float = 10.0, health: DatabaseHealth | None = None):
        self.policy = policy
        self.listener = policy.name
        self.dialect = dialect
        self.router = router
        self.request_timeout_s = request_timeout_s
        self.commit_wait_s = commit_wait_s
        self.health = health or DatabaseHealth()
        self.metrics = metrics.RequestMetrics(policy.name)

    def overloaded(self, frame: bytes, peer: str = "") -> Answer:
        """When too many requests are in progress: 96 at once, nothing routed; none at all for a
        request with a key (it may retransmit one that committed: its terminal reverses it)."""
        started = time.perf_counter()
        try:
            message = self.dialect.decode(frame)
        except DecodeFailure:
            return Answer(None, answerable=False)
        if has_request_key(message.fields):  # it may be the retransmission of something that committed
            self._log(message.fields, None, started, peer, op="overloaded")
            metrics.UNANSWERED.labels("overloaded").inc()
            return Answer(None, answerable=True)
        response = error_response(message.fields, codes.SYSTEM_MALFUNCTION)
        self._log(message.fields, response, started, peer, op="overloaded")
        if response is None:
            return Answer(None, answerable=False)
        return Answer(self._encode(response, message.envelope))

    async def handle(self, frame: bytes, peer: str = "", write_gate: gate.WriteGate | None = None) -> Answer:
        """``write_gate``: the connection's hold on this request (it abandons it when it
        closes); a fresh one when not given."""
        started = time.perf_counter()
        write_gate = write_gate or gate.WriteGate()
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
        with gate.gated(write_gate):
            work = asyncio.ensure_future(self.router.handle(message, Origin(self.policy, peer_address(peer))))
        work.add_done_callback(_retrieve)
        response, unknown = await self._outcome(work, write_gate, fields)
        self._log(fields, response, started, peer, op=response.op if response else "", outcome_unknown=unknown or None)
        if response is not None and logs.debug_enabled:
            log.debug("response", listener=self.listener, peer=peer, iso=masked_fields(response.fields))
        if response is None:
            return Answer(None, answerable=unknown)
        return Answer(self._encode(response, message.envelope), authenticated=response.authenticated)

    async def _outcome(self, work: asyncio.Future[Response | None], write_gate: gate.WriteGate,
                       fields: dict[str, str]) -> tuple[Response | None, bool]:
        """The response, and whether the outcome is unknown (then there is none).

        An answer never lies: past the deadline, a request that cannot write any more
        (nothing began, or its open transaction is cut off before COMMIT) gets 96; one
        whose COMMIT is under way is waited for, up to commit_wait_s, and answered
        with what happened; if the database never says, it is not answered at all."""
        done, _ = await asyncio.wait({work}, timeout=self.request_timeout_s)
        if not done:
            if write_gate.abandon():
                work.cancel()
                if has_request_key(fields) and not write_gate.key_checked:
                    return self._unanswered(fields, "key_unknown")
                log.error("request timed out before it could commit: answered 96", listener=self.listener,
                          timeout_s=self.request_timeout_s)
                return error_response(fields, codes.SYSTEM_MALFUNCTION), False
            log.warning("request past its deadline while committing: waiting for the outcome",
                        listener=self.listener, commit_wait_s=self.commit_wait_s)
            done, _ = await asyncio.wait({work}, timeout=self.commit_wait_s)
            if not done:
                write_gate.sever()
                work.cancel()
                metrics.UNANSWERED.labels("commit_timeout").inc()
                log.error("commit outcome unknown: not answered (the terminal's reversal settles it)",
                          listener=self.listener, mti=fields.get("t"), trace=fields.get("11"))
                return None, True
        try:
            response = self._result(work, write_gate)
        except _GivenUp:
            return None, True  # its connection closed before it could write: nobody to answer
        except Exception as exc:
            if write_gate.settled:
                metrics.UNANSWERED.labels("failure_after_commit").inc()
                log.error("request failed after something of it committed: not answered (the terminal's"
                          " reversal settles it)", listener=self.listener, error=type(exc).__name__)
                return None, True
            if isinstance(exc, DATABASE_ERRORS):
                self.health.failed(exc)
            else:
                log.exception("request failed", listener=self.listener, mti=fields.get("t"))
            if has_request_key(fields) and not write_gate.key_checked:
                return self._unanswered(fields, "key_unknown")
            return error_response(fields, codes.SYSTEM_MALFUNCTION), False
        if write_gate.began:  # it reached the database: an outage, if there was one, is over
            self.health.ok()
        return response, False

    def _unanswered(self, fields: dict[str, str], reason: str) -> tuple[None, bool]:
        """No answer: a 96 could be a lie, since an earlier attempt of this request may
        have committed and its stored outcome could not be read."""
        metrics.UNANSWERED.labels(reason).inc()
        log.warning("request not answered: whether an earlier attempt of it committed is unknown (the"
                    " terminal's reversal or retransmission settles it)", listener=self.listener,
                    mti=fields.get("t"), trace=fields.get("11"))
        return None, True

    @staticmethod
    def _result(work: asyncio.Future[Response | None], write_gate: gate.WriteGate) -> Response | None:
        """The request's response; _GivenUp when it failed because it was abandoned
        (its database connection cut, or refused a transaction), not because of a fault."""
        try:
            return work.result()
        except Exception:
            if write_gate.abandoned:
                raise _GivenUp from None
            raise

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
        seconds = time.perf_counter() - started
        latency_ms = round(seconds * 1000, 2)
        rc = response.fields.get("39") if response else None
        op = extra.get("op")
        self.metrics.observe(op if isinstance(op, str) else "", rc, seconds)
        event = "transaction" if rc == "00" else "transaction declined" if rc else "frame not answered"
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
