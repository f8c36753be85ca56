"""Load generator: N connections, a duration or a count, a mix of operations
across many cards, a live progress line, and a final report.

Speaks only the wire. Terminals are ``<prefix><n>`` (zero-padded to 8
characters) of one merchant, cards ``<first card> + i``; ``pointswitch admin
seed`` creates both.

The terminals follow terminal practice (``reversal_on_timeout``, see
``terminal``): an unanswered financial request is reversed until the reversal is
answered or its attempts run out. The report counts, per terminal, what it saw:
approved, declined, unanswered, and of the unanswered the reversals answered and
those never answered. With ``journal`` every request goes to a terminal journal
(``journal``), one line each.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .journal import TerminalJournal
from .terminal import NoAnswer, TerminalClient, TerminalError

# What a terminal saw, counted per terminal in the report.
OUTCOMES = ("approved", "declined", "unanswered", "reversal_answered", "reversal_unanswered")


@dataclass
class LoadPlan:
    host: str
    port: int
    merchant_id: str
    terminal_prefix: str = "L"
    first_terminal: int = 1  # connections use terminals first_terminal, first_terminal + 1, ...
    connections: int = 8
    depth: int = 1  # requests outstanding per connection
    duration_s: float | None = 10.0
    count: int | None = None
    first_card: int = 6288990000000000
    cards: int = 1000
    mix: dict[str, int] = field(default_factory=lambda: {"accrue": 80, "inquiry": 10, "redeem": 10})
    dialect: str = "cup"
    framing: str = "binary2"
    seed: int | None = None
    timeout_s: float = 10.0
    tmk: bytes | None = field(default=None, repr=False)  # master key of the load terminals
    pin: str = "123456"  # PIN of the load cards
    bank_card: str = "6222020000000000018"  # credited by cash_out operations
    reversal_on_timeout: bool = True  # terminal practice: reverse what goes unanswered
    reversal_attempts: int = 3
    reversal_delay_s: float = 1.0
    journal: Path | None = None  # JSON lines: every request and its outcome


@dataclass
class LoadReport:
    sent: int = 0
    elapsed_s: float = 0.0
    codes: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    terminals: dict[str, Counter[str]] = field(default_factory=dict)  # terminal id -> OUTCOMES

    def saw(self, terminal: str, outcome: str) -> None:
        self.terminals.setdefault(terminal, Counter({k: 0 for k in OUTCOMES}))[outcome] += 1

    @property
    def outcomes(self) -> dict[str, int]:
        return {k: sum(c[k] for c in self.terminals.values()) for k in OUTCOMES}

    @property
    def throughput_tps(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.sent,
            "answered": len(self.latencies_ms),
            "elapsed_s": round(self.elapsed_s, 3),
            "throughput_tps": round(self.throughput_tps, 1),
            "latency_ms_p50": round(self.percentile(0.50), 2),
            "latency_ms_p95": round(self.percentile(0.95), 2),
            "latency_ms_p99": round(self.percentile(0.99), 2),
            "latency_ms_max": round(max(self.latencies_ms, default=0.0), 2),
            "latency_ms_mean": round(statistics.fmean(self.latencies_ms), 2) if self.latencies_ms else 0.0,
            "response_codes": dict(sorted(self.codes.items())),
            "operations": dict(sorted(self.ops.items())),
            "errors": dict(self.errors),
            "outcomes": self.outcomes,
            "terminals": {t: {k: c[k] for k in OUTCOMES} for t, c in sorted(self.terminals.items())},
        }

    def render(self) -> str:
        d = self.as_dict()
        lines = [
            f"requests      {d['requests']} sent, {d['answered']} answered in {d['elapsed_s']} s",
            f"throughput    {d['throughput_tps']} per second",
            f"latency ms    p50 {d['latency_ms_p50']}  p95 {d['latency_ms_p95']}  "
            f"p99 {d['latency_ms_p99']}  max {d['latency_ms_max']}",
            "codes         " + "  ".join(f"{k}: {v}" for k, v in d["response_codes"].items()),
            "operations    " + "  ".join(f"{k}: {v}" for k, v in d["operations"].items()),
        ]
        if d["errors"]:
            lines.append("errors        " + "  ".join(f"{k}: {v}" for k, v in d["errors"].items()))
        lines.append("outcomes      " + _outcomes(d["outcomes"]))
        lines += [f"  {t:<10}  {_outcomes(c)}" for t, c in d["terminals"].items()]
        return "\n".join(lines)


def _outcomes(counts: dict[str, int]) -> str:
    return (f"approved {counts['approved']}  declined {counts['declined']}  unanswered {counts['unanswered']}"
            f" (reversed: answered {counts['reversal_answered']}, unanswered {counts['reversal_unanswered']})")


def terminal_id(prefix: str, n: int) -> str:
    return f"{prefix}{n:0{8 - len(prefix)}d}"


def card_number(first_card: int, i: int) -> str:
    return str(first_card + i)


async def run_load(plan: LoadPlan, progress: TextIO | None = sys.stderr) -> LoadReport:
    report = LoadReport()
    rng = random.Random(plan.seed)
    ops, weights = zip(*plan.mix.items(), strict=True)
    deadline = time.monotonic() + plan.duration_s if plan.duration_s else None
    budget = plan.count

    def take() -> bool:
        nonlocal budget
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if budget is not None:
            if budget <= 0:
                return False
            budget -= 1
        return True

    async def worker(client: TerminalClient) -> None:
        while take():
            if client.closed_by_peer:  # a terminal dials again
                try:
                    await client.reconnect()
                except (OSError, TimeoutError) as exc:
                    report.errors[f"reconnect: {type(exc).__name__}"] += 1
                    await asyncio.sleep(min(1.0, plan.timeout_s))
                    continue
            op = rng.choices(ops, weights)[0]
            card = card_number(plan.first_card, rng.randrange(plan.cards))
            amount = rng.randrange(100, 20000)
            report.sent += 1
            report.ops[op] += 1
            try:
                if op == "inquiry":
                    reply = await client.inquiry(card)
                elif op == "redeem":
                    reply = await client.redeem(card, rng.randrange(1, 200))
                elif op == "cash_out":  # through the bank host, when the switch has one
                    reply = await client.cash_out(card, rng.randrange(100, 500), plan.bank_card)
                else:
                    reply = await client.accrue(card, amount)
            except NoAnswer as exc:
                report.saw(client.terminal_id, "unanswered")
                if exc.reversal_attempts:
                    report.saw(client.terminal_id,
                               "reversal_answered" if exc.reversal is not None else "reversal_unanswered")
                continue
            except TerminalError as exc:
                report.errors[type(exc).__name__ + ": " + str(exc).split(" ")[0]] += 1
                continue
            report.codes[reply.rc] += 1
            report.latencies_ms.append(reply.latency_ms)
            report.saw(client.terminal_id, "approved" if reply.approved else "declined")

    clients: list[TerminalClient] = []
    journal = TerminalJournal(plan.journal) if plan.journal else None
    try:
        for n in range(plan.connections):
            client = TerminalClient(plan.host, plan.port, terminal_id(plan.terminal_prefix, plan.first_terminal + n),
                                    plan.merchant_id, dialect_name=plan.dialect, framing_name=plan.framing,
                                    timeout_s=plan.timeout_s, tmk=plan.tmk, default_pin=plan.pin,
                                    reversal_on_timeout=plan.reversal_on_timeout,
                                    reversal_attempts=plan.reversal_attempts,
                                    reversal_delay_s=plan.reversal_delay_s, journal=journal)
            clients.append(client)
            await client.connect()
            await client.sign_on()
            # Each run starts its traces where a previous run cannot have reached.
            client.trace = rng.randrange(0, 900000)
            report.terminals[client.terminal_id] = Counter({k: 0 for k in OUTCOMES})
        await _run(clients, worker, report, progress, plan.depth)
    finally:
        for c in clients:
            await c.close()
        if journal is not None:
            journal.close()
    return report


async def _run(clients: list[TerminalClient], worker: Any, report: LoadReport, progress: TextIO | None,
               depth: int) -> None:
    started = time.monotonic()

    async def show_progress() -> None:
        assert progress is not None
        while True:
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - started
            answered = len(report.latencies_ms)
            progress.write(
                f"\r{elapsed:6.1f} s  {answered:8d} answered  {answered / elapsed:8.1f}/s  "
                f"p99 {report.percentile(0.99):7.2f} ms  errors {sum(report.errors.values())}   "
            )
            progress.flush()

    ticker = asyncio.get_running_loop().create_task(show_progress()) if progress else None
    try:
        await asyncio.gather(*(worker(c) for c in clients for _ in range(depth)))
    finally:
        report.elapsed_s = time.monotonic() - started
        if ticker:
            ticker.cancel()
            assert progress is not None
            progress.write("\n")
