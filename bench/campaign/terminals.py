"""Terminals as a merchant's POS behaves, each keeping an exact journal of what it was told.

Practice (UnionPay POS): a request that gets no answer within the terminal's timeout is reversed
(0400, a copy of it with 39 = 98) and the reversal is repeated until it is answered; a terminal
told A0, or one that had to connect again, signs on before anything else; a connection that
cannot be made is tried again with growing delays. Some requests are sent a second time after
their answer (a retransmission: the same key and content), which must get the same answer.

``TerminalClient`` (pointswitch.simulators.terminal) is used for the wire only: codecs, MAC,
PIN blocks and matching answers to requests.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

from pointswitch.simulators.terminal import TerminalClient, TerminalError

from .common import say

# Answers that promise nothing was posted and are not logged under the key (so a retransmission is
# processed afresh and may be answered otherwise): 96, 91 (host unreachable, nothing held), A0.
NOTHING_DONE = {"96", "91", "A0"}
REVERSAL_ACKS = {"00", "25"}
# What sending on a connection the switch has dropped raises: the client's own error, or (uvloop)
# RuntimeError from a closed transport, or the socket's error. The request's fate is unknown.
WIRE_ERRORS = (TerminalError, RuntimeError, OSError, ConnectionError)
MAX_REVERSALS = 200  # attempts at one reversal before the terminal gives up (the entry stays "unresolved")
OPS = ("accrue", "redeem", "void", "refund", "cash_out", "insurance", "inquiry")
BANK_CARD = "6222020000000000018"
POLICY = "88001234"


@dataclass
class Rates:
    """What the campaign configured: the numbers a terminal's expectation is computed from."""

    earn_rate: Decimal = Decimal(100)  # points per yuan earned at the load merchant
    redeem_value: Decimal = Decimal(1)  # fen per point redeemed there
    cash_points_per_yuan: Decimal = Decimal(100)
    cash_fee_points: int = 1
    premium_points_per_yuan: Decimal = Decimal(100)
    premium_fee_points: int = 0

    def points(self, op: str, amount_fen: int) -> int | None:
        """Points the operation moves when approved (None: depends on history, read field 63)."""
        if op == "accrue":
            return int((Decimal(amount_fen) * self.earn_rate / 100).to_integral_value(ROUND_FLOOR))
        if op == "redeem":
            return int((Decimal(amount_fen) / self.redeem_value).to_integral_value(ROUND_CEILING))
        if op == "cash_out":
            return int((Decimal(amount_fen) * self.cash_points_per_yuan / 100).to_integral_value(ROUND_CEILING)
                       ) + self.cash_fee_points
        if op == "insurance":
            return int((Decimal(amount_fen) * self.premium_points_per_yuan / 100).to_integral_value(ROUND_CEILING)
                       ) + self.premium_fee_points
        return None


# Effect on the card's balance of an approved operation, per point it moved.
SIGN = {"accrue": 1, "redeem": -1, "void_accrual": -1, "void_redemption": 1, "refund": -1, "cash_out": -1,
        "insurance": -1, "inquiry": 0}


@dataclass
class Entry:
    """One request as the terminal saw it."""

    terminal: str
    batch: int
    trace: int
    op: str  # accrue, redeem, void_accrual, void_redemption, refund, cash_out, insurance, inquiry
    card: str
    amount_fen: int
    original_trace: int | None = None  # void, refund: the request they undo
    sent_at: float = 0.0
    answers: list[str] = field(default_factory=list)  # rc of each answer: first, then retransmissions
    final: str = ""  # the rc the terminal acts on; "reversed": unanswered, reversal answered 00/25;
    #                  "unresolved": unanswered and the reversal never answered within its bounds
    points: int | None = None  # field 63 of an approval (points moved), when it is a number
    rrn: str = ""
    auth: str = ""
    reversal_answers: list[str] = field(default_factory=list)  # rc of each answered reversal attempt
    reversal_attempts: int = 0
    dropped_mid_frame: bool = False
    contradiction: str = ""  # a retransmission answered differently from the answer it repeats
    voided: bool = False  # the terminal's view: a void of it was approved
    refunded_fen: int = 0  # ... refunds of it that were approved

    @property
    def key(self) -> str:
        return f"{self.terminal}:{self.batch:06d}:{self.trace:06d}"

    @property
    def approved(self) -> bool:
        return self.final == "00"


@dataclass
class Progress:
    """How far the load is: by time (``duration_s``), or by transactions (``transactions``, with the
    duration as the most it may take); a run by transactions also waits for the fuzzer's frames
    (``fuzz_frames``), so that both targets are reached."""

    duration_s: float
    transactions: int
    fuzz_frames: int = 0
    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    fuzzed: int = 0
    stopped: bool = False

    def fraction(self) -> float:
        by_time = (time.monotonic() - self.started) / self.duration_s if self.duration_s else 0.0
        if not self.transactions:
            return by_time
        by_count = self.sent / self.transactions
        if self.fuzz_frames:
            by_count = min(by_count, self.fuzzed / self.fuzz_frames)
        return max(by_time, by_count)

    def take(self) -> bool:
        if self.stopped or self.fraction() >= 1.0:
            self.stopped = True
            return False
        self.sent += 1
        return True

    def ahead(self) -> bool:
        """In a run by transactions with a fuzzer: the terminals are ahead of the fuzzer (they wait,
        so that the two targets are reached together rather than one long after the other)."""
        if not (self.transactions and self.fuzz_frames) or self.stopped:
            return False
        return self.sent / self.transactions > self.fuzzed / self.fuzz_frames + 0.02


@dataclass
class Stats:
    connects: int = 0
    connect_failures: int = 0
    sign_ons: Counter[str] = field(default_factory=Counter)
    sign_on_unanswered: int = 0
    late_answers: int = 0
    reconnects_after_timeouts: int = 0


class StopTerminal(Exception):
    """The terminal's hard deadline passed while it could not reach the switch."""


class CampaignTerminal:
    def __init__(self, terminal_id: str, merchant_id: str, port: int, tmk: bytes, pin: str, cards: list[str],
                 rng: random.Random, *, weights: dict[str, int], retransmit: float, timeout_s: float,
                 rates: Rates, stats: Stats, journal: list[Entry], hard_deadline: list[float]) -> None:
        self.terminal_id = terminal_id
        self.merchant_id = merchant_id
        self.port = port
        self.tmk = tmk
        self.pin = pin
        self.cards = cards
        self.rng = rng
        self.weights = weights
        self.retransmit = retransmit
        self.timeout_s = timeout_s
        self.rates = rates
        self.stats = stats
        self.journal = journal
        self.hard_deadline = hard_deadline  # [monotonic time]: set when the load ends
        self.client: TerminalClient | None = None
        self.signed_on = False
        self.trace = 0
        self.batch = 1
        self.backoff_s = 0.1
        self.timeouts_in_a_row = 0
        self.busy_pause = 0.0
        self.drop_next = False  # the fault schedule asks: send the next request's first half, then hang up
        self.mine: list[Entry] = []  # this terminal's entries, for voids and refunds
        self._closing: set[asyncio.Task[None]] = set()

    # -- connection ---------------------------------------------------------------------------
    def _past_deadline(self) -> bool:
        return bool(self.hard_deadline) and time.monotonic() > self.hard_deadline[0]

    async def _pause(self) -> None:
        await asyncio.sleep(self.backoff_s * (0.5 + self.rng.random()))
        self.backoff_s = min(self.backoff_s * 2, 2.0)

    async def _drop(self) -> None:
        client, self.client, self.signed_on = self.client, None, False
        if client is not None:
            self.trace = max(self.trace, client.trace)
            self.stats.late_answers += client._unmatched.qsize()
            await client.close()

    async def ready(self) -> TerminalClient:
        """Connected and signed on, trying again with growing delays until the hard deadline."""
        while True:
            if self.client is not None and self.client.closed_by_peer:
                await self._drop()
            if self.client is not None and self.signed_on:
                return self.client
            if self._past_deadline():
                raise StopTerminal
            if self.client is None:
                client = TerminalClient("127.0.0.1", self.port, self.terminal_id, self.merchant_id,
                                        timeout_s=self.timeout_s, tmk=self.tmk, default_pin=self.pin)
                client.trace, client.batch = self.trace, self.batch
                try:
                    await client.connect()
                except (OSError, TimeoutError):
                    self.stats.connect_failures += 1
                    await self._pause()
                    continue
                self.stats.connects += 1
                self.client = client
            try:
                reply = await self.client.sign_on()
            except WIRE_ERRORS:
                self.stats.sign_on_unanswered += 1
                await self._drop()
                await self._pause()
                continue
            self.stats.sign_ons[reply.rc] += 1
            self.trace, self.batch = self.client.trace, self.client.batch
            if reply.rc == "00":
                self.signed_on = True
                self.backoff_s = 0.1
                return self.client
            await self._pause()  # 96 (database away), 65 (too many sign-ons): later

    async def close(self) -> None:
        await self._drop()

    # -- one request --------------------------------------------------------------------------
    def _choose(self) -> tuple[str, str, int, dict[str, str], int | None]:
        """(operation, card, amount, extra fields, original trace)."""
        ops, weights = zip(*self.weights.items(), strict=True)
        op = self.rng.choices(ops, weights)[0]
        if op == "void":
            candidates = [e for e in self.mine if e.approved and e.op in ("accrue", "redeem") and e.batch == self.batch
                          and not e.voided and not e.refunded_fen]
            if candidates:
                orig = self.rng.choice(candidates)
                kind = "void_accrual" if orig.op == "accrue" else "void_redemption"
                extra = {"61": f"{orig.batch:06d}{orig.trace:06d}"}
                if orig.rrn:
                    extra["37"] = orig.rrn
                return kind, orig.card, orig.amount_fen, extra, orig.trace
            op = "accrue"
        if op == "refund":
            candidates = [e for e in self.mine if e.approved and e.op == "accrue" and not e.voided
                          and e.amount_fen - e.refunded_fen > 0]
            if candidates:
                orig = self.rng.choice(candidates)
                left = orig.amount_fen - orig.refunded_fen
                amount = self.rng.randint(1, left)
                extra = {"61": f"{orig.batch:06d}{orig.trace:06d}{datetime.now():%m%d}"}
                return "refund", orig.card, amount, extra, orig.trace
            op = "accrue"
        card = self.rng.choice(self.cards)
        if op == "accrue":
            return op, card, self.rng.randint(100, 3000), {}, None
        if op == "redeem":
            return op, card, self.rng.randint(50, 2000), {}, None
        if op == "cash_out":
            return op, card, self.rng.randint(100, 500), {"48": BANK_CARD}, None
        if op == "insurance":
            return op, card, self.rng.randint(100, 800), {"48": POLICY}, None
        return "inquiry", card, 0, {}, None

    async def transact(self) -> None:
        op, card, amount, extra, original_trace = self._choose()
        client = await self.ready()
        fields = client.request(op, card, amount if op != "inquiry" else None, **extra)
        self.trace = client.trace
        entry = Entry(self.terminal_id, self.batch, int(fields["11"]), op, card, amount, original_trace,
                      sent_at=round(time.time(), 3))
        self.journal.append(entry)
        self.mine.append(entry)
        reply = None
        if self.drop_next:
            self.drop_next = False
            entry.dropped_mid_frame = True
            frame = client.framing.frame(client.dialect.encode(fields, sign=client._mac_fn()))
            try:
                await client.send_raw(frame[: max(1, len(frame) // 2)])
            except WIRE_ERRORS:
                pass
            say(f"mid-frame drop: {self.terminal_id} sent {len(frame) // 2} of {len(frame)} bytes of trace"
                f" {entry.trace}, then hung up", echo=False)
            await self._drop()
        else:
            try:
                reply = await client.send(fields)
            except WIRE_ERRORS:
                reply = None
        if reply is None:
            self._timed_out(client)
            if op == "inquiry":  # nothing to undo
                entry.final = "unanswered"
            else:
                await self._reverse(entry, fields)
            return
        self.timeouts_in_a_row = 0
        self._answered(entry, reply.rc, reply.fields)
        if reply.rc == "A0":
            self.signed_on = False
        if self.rng.random() < self.retransmit:
            await self._retransmit(entry, fields)
        self._settle(entry)
        if entry.final in ("96", "91"):  # the switch or the host is in trouble: the cashier tries again later
            self.busy_pause = min(max(self.busy_pause * 2, 0.1), 1.0)
            await asyncio.sleep(self.busy_pause * (0.5 + self.rng.random()))
        else:
            self.busy_pause = 0.0

    def _timed_out(self, client: TerminalClient) -> None:
        self.timeouts_in_a_row += 1
        stale = self.client
        if self.timeouts_in_a_row >= 2 and stale is not None and stale is client:  # it answers nothing: a new one
            self.stats.reconnects_after_timeouts += 1
            self.signed_on = False
            self.client = None
            self.trace = max(self.trace, stale.trace)
            closing = asyncio.get_running_loop().create_task(stale.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def _answered(self, entry: Entry, rc: str, answer: dict[str, str]) -> None:
        entry.answers.append(rc)
        entry.final = rc
        if rc == "00":
            points = answer.get("63", "").strip()
            entry.points = int(points) if points.isdigit() and entry.op != "insurance" else None
            entry.rrn, entry.auth = answer.get("37", ""), answer.get("38", "")

    async def _retransmit(self, entry: Entry, fields: dict[str, str]) -> None:
        """The same request again (same key, same content): the same answer, or, after an answer
        that promised nothing was done, the request processed now."""
        try:
            client = await self.ready()
        except StopTerminal:
            return  # not sent: the terminal has its answer
        try:
            reply = await client.send(dict(fields))
        except WIRE_ERRORS:
            if entry.final in NOTHING_DONE:  # this time it may have been processed: unknown, so reverse it
                entry.answers.append("none")
                self._timed_out(client)
                await self._reverse(entry, fields)
            return  # after an answer that is kept under the key, a repeat changes nothing
        first = entry.final
        if reply.rc == "A0":
            entry.answers.append(reply.rc)
            self.signed_on = False
            return
        if first in NOTHING_DONE:
            self._answered(entry, reply.rc, reply.fields)
            return
        entry.answers.append(reply.rc)
        if entry.op == "inquiry":  # not kept under a key: each one is answered afresh (a new 37, 38)
            return
        same = reply.rc == first and (first != "00" or (reply.fields.get("37", "") == entry.rrn
                                                          and reply.fields.get("38", "") == entry.auth))
        if not same:
            entry.contradiction = (f"answered {first} (37={entry.rrn} 38={entry.auth}), retransmission answered"
                                   f" {reply.rc} (37={reply.fields.get('37', '')} 38={reply.fields.get('38', '')})")

    async def _reverse(self, entry: Entry, fields: dict[str, str]) -> None:
        """No answer: reverse, and repeat the reversal until it is answered (00 or 25)."""
        pause = 0.2
        while True:
            if (self._past_deadline() and entry.reversal_attempts >= 3) or entry.reversal_attempts >= MAX_REVERSALS:
                entry.final = "unresolved"
                return
            try:
                client = await self.ready()
            except StopTerminal:
                entry.final = "unresolved"
                return
            entry.reversal_attempts += 1
            try:
                reply = await client.reverse(fields)
            except WIRE_ERRORS:
                self._timed_out(client)
                continue
            self.timeouts_in_a_row = 0
            entry.reversal_answers.append(reply.rc)
            if reply.rc in REVERSAL_ACKS:
                entry.final = "reversed"
                self._settle(entry)
                return
            if reply.rc == "A0":
                self.signed_on = False
                continue
            await asyncio.sleep(pause * (0.5 + self.rng.random()))  # 96: the database is away; again later
            pause = min(pause * 2, 2.0)

    def _settle(self, entry: Entry) -> None:
        """What the terminal now believes about the originals of voids and refunds."""
        if entry.original_trace is None or entry.final != "00":
            return
        orig = next((e for e in self.mine if e.trace == entry.original_trace and e.batch == entry.batch), None)
        if orig is None:
            return
        if entry.op.startswith("void"):
            orig.voided = True
        elif entry.op == "refund":
            orig.refunded_fen += entry.amount_fen

    async def run(self, progress: Progress) -> None:
        try:
            while True:
                while progress.ahead() and progress.fraction() < 1.0:  # noqa: ASYNC110 - counts, not events
                    await asyncio.sleep(0.05)
                if not progress.take():
                    break
                await self.transact()
        except StopTerminal:
            pass
        finally:
            await self.close()


def write_journal(path: Path, journal: list[Entry]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for entry in journal:
            f.write(json.dumps({"key": entry.key, **asdict(entry)}) + "\n")


def summary(journal: list[Entry]) -> dict[str, Any]:
    financial = [e for e in journal if e.op != "inquiry"]
    return {
        "requests": len(journal),
        "financial": len(financial),
        "by_op": dict(Counter(e.op for e in journal).most_common()),
        "approved": sum(1 for e in financial if e.final == "00"),
        "declined": sum(1 for e in financial if e.final not in ("00", "reversed", "unresolved", "unanswered")),
        "codes": dict(Counter(e.final for e in journal).most_common()),
        "unanswered": sum(1 for e in journal if e.final in ("reversed", "unresolved", "unanswered")),
        "reversed": sum(1 for e in journal if e.final == "reversed"),
        "reversal_repeats": sum(max(0, e.reversal_attempts - 1) for e in journal),
        "unresolved": sum(1 for e in journal if e.final == "unresolved"),
        "retransmissions": sum(max(0, len(e.answers) - 1) for e in journal),
        "dropped_mid_frame": sum(1 for e in journal if e.dropped_mid_frame),
        "contradictions": [e for e in journal if e.contradiction],
    }
