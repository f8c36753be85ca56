"""The store-and-forward worker: delivers reversals owed to upstream hosts.

Reversals wait in PostgreSQL (``ledger.saf``). This worker claims the due ones
of each connector whose host is reachable, sends each (0400 first, then 0420
repeats), and records the acknowledgement (an answer whose 39 is in
``REVERSAL_ACKNOWLEDGED``: 00 or 25) or schedules the next try (no answer, or
any other code: the host may still hold the credit). It also
times out requests left pending past their deadline (a process that stopped
with a leg out), and publishes each connector's state for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping

import structlog

from ..codecs import Fields
from ..ledger.saf import DueReversal, ReversalQueue
from ..routing.legs import REVERSAL_ACKNOWLEDGED, UpstreamError, repeat_of
from ..tasks import cancel_and_wait
from .health import DATABASE_ERRORS
from .upstream import Connector

log = structlog.get_logger("pointswitch.forwarder")


class ReversalForwarder:
    def __init__(self, queue: ReversalQueue, connectors: Mapping[str, Connector], *, poll_s: float = 1.0,
                 sweep_s: float = 2.0, batch: int = 32, status_s: float = 2.0):
        self.queue = queue
        self.connectors = dict(connectors)
        self.poll_s, self.sweep_s, self.batch, self.status_s = poll_s, sweep_s, batch, status_s
        self._wake = asyncio.Event()
        self._database_down = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reversal-forwarder")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        with contextlib.suppress(Exception):
            await self._publish()

    def nudge(self) -> None:
        self._wake.set()

    async def on_late(self, connector: Connector, fields: Fields) -> None:
        """A response nobody waits for. A late approval changes nothing here: its request
        was released when it timed out and its reversal is queued; send it now."""
        if fields.get("t") == "0210" and fields.get("39") == "00":
            log.warning("late approval from upstream: answered by the reversal, not posted",
                        connector=connector.name, trace=fields.get("11"))
        self.nudge()

    async def _run(self) -> None:
        last_sweep = last_status = 0.0
        while True:
            try:
                now = time.monotonic()
                if now - last_sweep >= self.sweep_s:
                    last_sweep = now
                    await self.queue.time_out_stale()
                if now - last_status >= self.status_s:
                    last_status = now
                    await self._publish()
                sends = []
                for connector in self.connectors.values():
                    if connector.available:
                        due = await self.queue.claim(connector.name, limit=self.batch,
                                                     lease_s=connector.cfg.response_timeout_s + 5)
                        sends += [self._send(connector, d) for d in due]
                if self._database_down:
                    self._database_down = False
                    log.warning("store-and-forward resumed: the database is back")
                if sends:
                    await asyncio.gather(*sends)
                    continue  # there may be more
            except asyncio.CancelledError:
                raise
            except DATABASE_ERRORS as exc:  # one line per outage, not one per pass
                if not self._database_down:
                    self._database_down = True
                    log.warning("store-and-forward paused: the database is unavailable", error=type(exc).__name__)
            except Exception:
                log.exception("store-and-forward pass failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()

    async def _send(self, connector: Connector, due: DueReversal) -> None:
        fields = repeat_of(json.loads(due.message), due.attempts)
        cfg = connector.cfg
        rc = ""
        try:
            reply = await connector.request(fields)
        except UpstreamError as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            rc = reply.get("39", "")
            if rc in REVERSAL_ACKNOWLEDGED:
                await self.queue.acknowledged(due.reversal_id, rc)
                return
            error = f"refused by the host: 39 = {rc or 'absent'}"
        log.warning("upstream reversal not acknowledged; will retry", connector=connector.name,
                    reversal_id=due.reversal_id, attempt=due.attempts, error=error, rc=rc or None)
        await self.queue.retry_later(due.reversal_id, error, upstream_rc=rc or None,
                                     first_s=cfg.reversal_retry_s, max_s=cfg.reversal_retry_max_s,
                                     max_age_s=cfg.reversal_max_age_s)

    async def _publish(self) -> None:
        await self.queue.publish({name: c.state() for name, c in self.connectors.items()})
