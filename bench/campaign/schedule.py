"""The fault schedule and the injector: kills, stops and dropped connections at set points of the
load's progress, each logged with a timestamp, each healed before the next (a switch killed comes
back while PostgreSQL runs; a PostgreSQL killed comes back before anything else happens).

A watchdog restarts, as an operator would, a switch or host simulator that exits on its own, and
counts it: that is a finding, not part of the plan.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from .common import say
from .fuzz import Fuzzer
from .processes import Postgres, Service
from .terminals import CampaignTerminal, Progress


@dataclass
class FaultPlan:
    switch_kills: int = 2
    pg_kills: int = 1
    pg_stops: int = 1
    bank_kills: int = 1
    mid_frame_drops: int = 8
    pg_stop_s: float = 3.5  # longer than the switch's request_timeout_s
    # Every second stop, and every second kill of PostgreSQL, lasts longer than the terminals' timeout:
    # reversals then meet the outage too (answered 96 or not at all) and must be repeated.
    pg_stop_long_s: float = 8.0
    pg_down_long_s: float = 6.0
    bank_down_s: float = 1.0

    def events(self) -> list[tuple[float, str]]:
        """Disruptive faults at points of the load's progress, spread evenly and interleaved."""
        counts = {"switch_kill": self.switch_kills, "pg_kill": self.pg_kills, "pg_stop": self.pg_stops,
                  "bank_kill": self.bank_kills}
        order = sorted(((i + 0.5) / n, kind) for kind, n in counts.items() for i in range(n))
        total = len(order)
        return [(0.06 + 0.80 * (j + 0.5) / total, kind) for j, (_, kind) in enumerate(order)]

    def drops(self) -> list[float]:
        n = self.mid_frame_drops
        return [0.03 + 0.92 * (j + 0.5) / n for j in range(n)]


@dataclass
class Fault:
    wall: float
    at_s: float  # since the load started
    kind: str
    detail: str
    healed_s: float | None = None


@dataclass
class Injector:
    plan: FaultPlan
    postgres: Postgres
    switch: Service
    hosts: list[Service]  # bank first
    terminals: list[CampaignTerminal]
    fuzzer: Fuzzer | None
    progress: Progress
    rng: random.Random
    done: Counter[str] = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)
    unplanned: list[str] = field(default_factory=list)  # processes that exited on their own
    not_injected: list[str] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _stop: bool = False

    def _record(self, kind: str, detail: str) -> Fault:
        fault = Fault(time.time(), time.monotonic() - self.progress.started, kind, detail)
        self.faults.append(fault)
        say(f"FAULT {kind}: {detail}")
        return fault

    def _healed(self, fault: Fault, what: str) -> None:
        fault.healed_s = round(time.time() - fault.wall, 2)
        say(f"healed {fault.kind} after {fault.healed_s:.2f} s: {what}")

    async def _until(self, fraction: float) -> bool:
        while self.progress.fraction() < fraction:
            if self.progress.stopped or self._stop:
                return False
            await asyncio.sleep(0.05)
        return True

    # -- the faults ---------------------------------------------------------------------------
    async def switch_kill(self) -> None:
        pid = await asyncio.to_thread(self.switch.kill9)
        fault = self._record("switch_kill", f"kill -9 of the switch (pid {pid}); PostgreSQL keeps running")
        await asyncio.to_thread(self.switch.start)
        self._healed(fault, f"switch started again on the same data (pid {self.switch.pid})")

    async def pg_kill(self) -> None:
        down_s = self.plan.pg_down_long_s if self.done["pg_kill"] % 2 else 0.5
        pid = await asyncio.to_thread(self.postgres.kill9)
        fault = self._record("pg_kill", f"kill -9 of the PostgreSQL postmaster (pid {pid}); its processes are gone;"
                                        f" started again after {down_s:g} s")
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.postgres.restart)
        self._healed(fault, f"PostgreSQL started again (postmaster pid {self.postgres.postmaster_pid()})")

    async def pg_stop(self) -> None:
        stop_s = self.plan.pg_stop_long_s if self.done["pg_stop"] % 2 else self.plan.pg_stop_s
        pids = self.postgres.sigstop()
        fault = self._record("pg_stop", f"SIGSTOP of {len(pids)} PostgreSQL processes for {stop_s:g} s")
        try:
            await asyncio.sleep(stop_s)
        finally:
            self.postgres.sigcont()
        self._healed(fault, "SIGCONT")

    async def bank_kill(self) -> None:
        bank = self.hosts[0]
        pid = await asyncio.to_thread(bank.kill9)
        fault = self._record("bank_kill",
                             f"kill -9 of the bank simulator (pid {pid}), down {self.plan.bank_down_s:g} s")
        await asyncio.sleep(self.plan.bank_down_s)
        await asyncio.to_thread(bank.start)
        self._healed(fault, f"bank simulator started again on the same journal (pid {bank.pid})")

    async def mid_frame_drop(self, n: int) -> None:
        if n % 2 == 0 or self.fuzzer is None:
            term = self.rng.choice(self.terminals)
            term.drop_next = True
            self._record("mid_frame_drop", f"{term.terminal_id} sends half of its next request, then hangs up")
        else:
            await self.fuzzer.half_frame()
            self._record("mid_frame_drop", "a connection sends half a frame and closes")
        self.done["mid_frame_drop"] += 1

    # -- running ------------------------------------------------------------------------------
    async def run(self) -> None:
        for at, kind in self.plan.events():
            if not await self._until(at):
                self.not_injected.append(kind)
                continue
            async with self.lock:
                await getattr(self, kind)()
                self.done[kind] += 1

    async def drops(self) -> None:
        for n, at in enumerate(self.plan.drops()):
            if not await self._until(at):
                self.not_injected.append("mid_frame_drop")
                continue
            await self.mid_frame_drop(n)

    async def watchdog(self) -> None:
        """A process that exits by itself is started again, as an operator would (once the fault
        under way, if any, has healed)."""
        while not self._stop:
            await asyncio.sleep(0.2)
            for service in (self.switch, *self.hosts):
                if service.proc is None or service.alive() or service.planned_exit:
                    continue
                async with self.lock:
                    if service.alive() or service.planned_exit:
                        continue
                    code = service.reap()
                    tail = service.log_tail(8).replace("\n", "\n    ")
                    note = f"{service.name} (pid {service.pid}) exited by itself with code {code}"
                    self.unplanned.append(note)
                    fault = self._record("unplanned_exit", f"{note}; its log ends:\n    {tail}")
                    for attempt in range(60):
                        try:
                            await asyncio.to_thread(service.start)
                            break
                        except Exception as exc:
                            say(f"restarting {service.name} (attempt {attempt + 1}) failed: {exc}")
                            await asyncio.sleep(1.0)
                    self._healed(fault, f"{service.name} started again by the campaign (pid {service.pid})")

    def stop(self) -> None:
        self._stop = True
