"""The delivery worker: claims due messages, sends them, marks them (docs/messages.md).

One batch is one transaction: claim (FOR UPDATE SKIP LOCKED, so workers in other
processes take other rows), decide each message (opted out, too old, quiet
hours, rate limit, or send), send the ones to send at once, and mark every one
after its channel answered, then commit. A worker that dies between the send and
the commit loses nothing (the rows were never marked) and the next send carries
the same idempotency key, which the SMS gateway and the webhook honour.

Woken by NOTIFY pointswitch_outbox (the triggers send it); polls as well, and
sleeps no longer than until the next message falls due.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import time
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import structlog
from prometheus_client import Counter, Gauge

from ..config import MessagesConfig
from ..ledger import outbox
from ..ledger.outbox import Message
from ..ledger.vault import Vault
from ..tasks import cancel_and_wait
from .channels import Channel, Outgoing, SendError, build_channels
from .templates import render, variables

log = structlog.get_logger("pointswitch.messages")

Connect = Callable[[], Awaitable[asyncpg.Connection]]

DELIVERED = Counter("pointswitch_messages_delivered_total", "Messages a channel took", ["channel"])
SEND_FAILURES = Counter("pointswitch_message_send_failures_total", "Sends that did not go through", ["channel"])
GIVEN_UP = Counter("pointswitch_messages_failed_total", "Messages given up (attempts, age, opted out)", ["channel"])
WAITING = Gauge("pointswitch_messages_waiting", "Messages in the outbox not yet delivered nor given up", ["channel"])

_WAITING_EVERY_S = 30.0  # how often the waiting messages are counted (a count over the outbox's queue)

_LISTEN_RETRY_S = 5.0
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def quiet_until(now: datetime.datetime, start: datetime.time, end: datetime.time, zone: ZoneInfo
                ) -> datetime.datetime | None:
    """The end of the quiet hours ``now`` falls in (local times in ``zone``), or None."""
    if start == end:
        return None
    local = now.astimezone(zone)
    t = local.time()
    quiet = start <= t < end if start < end else (t >= start or t < end)
    if not quiet:
        return None
    day = local.date() if t < end else local.date() + datetime.timedelta(days=1)
    return datetime.datetime.combine(day, end, tzinfo=zone)


def backoff_s(attempts: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """The wait after the ``attempts``-th failed send: doubling, capped, +-25 % jitter."""
    return min(max_s, initial_s * 2 ** max(0, attempts - 1)) * rng.uniform(0.75, 1.25)


class Messenger:
    """Delivers the outbox on the channels it has (``channels`` for tests; default:
    those the settings turn on)."""

    def __init__(self, pool: asyncpg.Pool, vault: Vault, settings: MessagesConfig, *, time_zone: str,
                 connect: Connect | None = None, channels: dict[str, Channel] | None = None):
        self._pool = pool
        self._vault = vault
        self.settings = settings
        self._zone = ZoneInfo(time_zone)
        self._quiet = (datetime.time.fromisoformat(settings.quiet_hours_start),
                       datetime.time.fromisoformat(settings.quiet_hours_end))
        self._connect = connect
        self._given_channels = channels
        self.channels: dict[str, Channel] = dict(channels or {})
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection | None = None
        self._rng = random.Random()
        self.now = lambda: datetime.datetime.now(datetime.UTC)  # the clock quiet hours are read on

    # -- life cycle -----------------------------------------------------------------
    async def start(self) -> None:
        if self._given_channels is None:
            self._session = aiohttp.ClientSession()
            self.channels = build_channels(self.settings, self._session)
        self._tasks.append(asyncio.create_task(self._run(), name="messenger"))
        if self._connect is not None:
            self._tasks.append(asyncio.create_task(self._listen(self._connect), name="messenger-listener"))
        log.info("messages worker started", channels=sorted(self.channels))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def wake(self) -> None:
        self._wake.set()

    # -- the loop -------------------------------------------------------------------
    async def _run(self) -> None:
        next_housekeeping = next_count = 0.0
        while True:
            self._wake.clear()
            sleep_s = self.settings.poll_interval_s
            try:
                if time.monotonic() >= next_housekeeping:
                    await self.housekeeping()
                    next_housekeeping = time.monotonic() + self.settings.expiring_check_interval_s
                if time.monotonic() >= next_count:
                    await self._count_waiting()
                    next_count = time.monotonic() + _WAITING_EVERY_S
                while await self.run_once() >= self.settings.batch_size:
                    pass
                due = await self._next_due()
                if due is not None:
                    sleep_s = min(sleep_s, max(0.05, (due - self.now()).total_seconds()))
            except _DB_ERRORS as exc:
                log.warning("messages not delivered; trying again", error=type(exc).__name__)
            except Exception:  # the worker keeps running; the batch rolled back and is claimed again
                log.exception("messages worker failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep_s)

    async def _listen(self, connect: Connect) -> None:
        while True:
            try:
                con = await connect()
                lost = asyncio.Event()
                con.add_termination_listener(lambda _c, lost=lost: lost.set())
                await con.add_listener(outbox.NOTIFY_CHANNEL, lambda *_args: self._wake.set())
                self._listener = con
                await lost.wait()
                log.warning("messages worker lost its notifications; polling until they are back")
            except _DB_ERRORS as exc:
                log.warning("messages worker cannot listen; polling", error=type(exc).__name__)
            self._listener = None
            await asyncio.sleep(_LISTEN_RETRY_S)

    async def housekeeping(self) -> None:
        """Once per ``expiring_check_interval_s``: the expiry warnings, and giving up old messages."""
        await self.queue_warnings()
        async with self._pool.acquire() as con:
            old = await outbox.give_up_old(con, self.settings.max_age_s)
        for channel, n in old.items():
            GIVEN_UP.labels(channel).inc(n)
            log.warning("messages given up: older than max_age_s", channel=channel, messages=n)

    async def _count_waiting(self) -> None:
        async with self._pool.acquire() as con:
            counts = await outbox.waiting(con)
        for channel in ("sms", "email", "webhook"):
            WAITING.labels(channel).set(counts.get(channel, 0))

    async def queue_warnings(self) -> int:
        """Queue "points expiring soon" for cards with points expiring within the warning days."""
        async with self._pool.acquire() as con:
            return await outbox.queue_points_expiring(con, self.settings.expiring_warning_days)

    async def _next_due(self) -> datetime.datetime | None:
        if not self.channels:
            return None
        async with self._pool.acquire() as con:
            return await outbox.next_due(con, list(self.channels))

    async def run_once(self) -> int:
        """Claim, send and mark one batch; returns how many messages it claimed."""
        if not self.channels:
            return 0
        async with self._pool.acquire() as con, con.transaction():
            claimed = await outbox.claim(con, self._vault, list(self.channels), self.settings.batch_size)
            if not claimed:
                return 0
            to_send = await self._sort(con, claimed)
            errors = await asyncio.gather(*(self._send(out) for out in to_send))
            for out, error in zip(to_send, errors, strict=True):
                await self._mark(con, out.message, error)
        return len(claimed)

    async def _sort(self, con: asyncpg.Connection, claimed: list[Message]) -> list[Outgoing]:
        """Give up, hold or keep each claimed message; the kept ones, rendered."""
        s = self.settings
        now = self.now()
        recent = await outbox.delivered_last_hour(con, sorted({(m.recipient_ref, m.channel) for m in claimed}))
        counts = {k: n for k, (n, _oldest) in recent.items()}
        to_send = []
        for m in claimed:
            if not m.opt_in:
                await self._give_up(con, m, "the recipient opted out", attempted=False)
                continue
            if (now - m.since).total_seconds() > s.max_age_s:
                await self._give_up(con, m, f"not delivered within max_age_s ({s.max_age_s:g})", attempted=False)
                continue
            quiet_end = quiet_until(now, *self._quiet, self._zone) if m.recipient_kind == "member" else None
            if quiet_end is not None:
                await outbox.defer(con, m.message_id, quiet_end, "quiet hours")
                continue
            key = (m.recipient_ref, m.channel)
            if counts.get(key, 0) >= s.rate_limit_per_hour:
                oldest = recent.get(key, (0, None))[1] or now
                await outbox.defer(con, m.message_id, max(oldest + datetime.timedelta(hours=1), now),
                                   f"rate limit ({s.rate_limit_per_hour} per hour)")
                continue
            counts[key] = counts.get(key, 0) + 1
            subject, text = render(m.kind, m.language, m.payload)
            if len(text.encode()) > s.max_body_bytes:
                await self._give_up(con, m, "longer than max_body_bytes", attempted=False)
                continue
            to_send.append(Outgoing(m, subject, text, variables(m.payload)))
        return to_send

    async def _send(self, out: Outgoing) -> SendError | None:
        channel = self.channels[out.message.channel]
        try:
            await asyncio.wait_for(channel.send(out), self.settings.send_timeout_s + 2)
        except SendError as exc:
            return exc
        except TimeoutError:
            return SendError("no answer within send_timeout_s")
        except Exception as exc:  # a channel's surprise is one failed send, not a dead worker
            # Its type only: an exception's text may carry the address.
            log.warning("message channel failed", channel=out.message.channel, message=out.message.message_id,
                        error=type(exc).__name__)
            return SendError(f"the {out.message.channel} channel failed: {type(exc).__name__}")
        return None

    async def _mark(self, con: asyncpg.Connection, m: Message, error: SendError | None) -> None:
        s = self.settings
        if error is None:
            await outbox.mark_delivered(con, m.message_id)
            DELIVERED.labels(m.channel).inc()
            log.info("message delivered", message=m.message_id, kind=m.kind, channel=m.channel)
            return
        SEND_FAILURES.labels(m.channel).inc()
        if error.permanent or m.attempts + 1 >= s.max_attempts:
            await self._give_up(con, m, str(error))
            return
        delay = backoff_s(m.attempts + 1, s.backoff_initial_s, s.backoff_max_s, self._rng)
        await outbox.mark_retry(con, m.message_id, delay, str(error))
        log.warning("message not delivered; trying again", message=m.message_id, channel=m.channel,
                 attempts=m.attempts + 1, retry_in_s=round(delay, 1), error=str(error))

    async def _give_up(self, con: asyncpg.Connection, m: Message, reason: str, *, attempted: bool = True) -> None:
        await outbox.mark_failed(con, m.message_id, reason, attempted=attempted)
        GIVEN_UP.labels(m.channel).inc()
        log.warning("message given up", message=m.message_id, kind=m.kind, channel=m.channel, reason=reason)
