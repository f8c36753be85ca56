#!/usr/bin/env python3
"""Fault campaign: under faults, a terminal is never told a lie, nothing is lost or doubled,
nothing gets stuck.

    python3 dev.py faults --short          # about a minute; what CI runs (tests/test_fault_campaign.py)
    python3 dev.py faults --long           # 100,000 transactions, 20 switch kills, 5 PostgreSQL kills, 1M fuzzed frames
    python3 dev.py faults --long --transactions 20000 --switch-kills 5 --fuzz-frames 200000   # a smaller long run

One run:

1. an embedded PostgreSQL server in a temporary folder; the bank and insurer host simulators
   (``pointswitch sim bank|insurer --ledger``, processes); ``admin seed`` of a merchant, the load
   terminals, the fuzzer's terminals and cards; ``pointswitch serve`` (a process) with one ``cup``
   listener on 127.0.0.1 and connectors to both hosts;
2. the load, from this process: many terminals (accruals, redemptions with PIN, voids, refunds,
   cash-outs, premiums, inquiries, retransmissions), each keeping a journal of what it was told and
   following terminal practice (an unanswered request is reversed, and the reversal repeated until
   it is answered; sign on again after A0 or a new connection; reconnect with backoff);
3. meanwhile, faults on a schedule: kill -9 of the switch (started again on the same data while
   PostgreSQL runs), kill -9 of PostgreSQL's postmaster (started again), SIGSTOP/SIGCONT of every
   PostgreSQL process for longer than the switch's request timeout, kill -9 of the bank simulator
   (started again on the same journal), connections dropped mid-frame, and a fuzzer on the listener;
4. at the end (load stopped, faults healed, pending requests and reversals drained): every
   terminal's view against the ledger and the hosts' journals, the ledger invariants
   (``admin check``), processes left behind, the switch's memory and descriptors; one table.

Exit status 0 when nothing was found, 1 on any violation, 2 when the campaign itself failed.
Everything started is stopped and the folder removed at the end (kept on a violation, or with
``--keep always``), also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from campaign.common import CampaignError, say
from campaign.fuzz import Fuzzer
from campaign.processes import Processes, Sampler, install_interrupt_handlers, interruptible
from campaign.reconcile import drained, reconcile
from campaign.schedule import FaultPlan, Injector
from campaign.setup import (
    COMMIT_WAIT_S,
    MERCHANT,
    PIN,
    REQUEST_TIMEOUT_S,
    Setup,
    set_up,
)
from campaign.terminals import CampaignTerminal, Entry, Progress, Stats, summary, write_journal
from campaign.verdict import LoadResult, evidence, ledger_check, log_summary, render, verdicts

PRESETS: dict[str, dict[str, Any]] = {
    "short": dict(terminals=10, cards_per_terminal=4, duration=42.0, transactions=0, switch_kills=3, pg_kills=2,
                  pg_stops=2, bank_kills=2, mid_frame_drops=10, fuzz_frames=10000, fuzz_rate=500.0, drain_timeout=20.0,
                  reversal_grace=15.0),
    "long": dict(terminals=24, cards_per_terminal=4, duration=5400.0, transactions=100_000, switch_kills=20,
                 pg_kills=5, pg_stops=5, bank_kills=5, mid_frame_drops=100, fuzz_frames=1_000_000, fuzz_rate=4000.0,
                 drain_timeout=120.0, reversal_grace=60.0),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="faults.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--short", dest="preset", action="store_const", const="short",
                      help="about a minute, a few of each fault (the default)")
    size.add_argument("--long", dest="preset", action="store_const", const="long",
                      help="100,000 transactions, 20 switch kills, 5 PostgreSQL kills, 1M fuzzed frames")
    p.add_argument("--terminals", type=int, help="load terminals (one connection each)")
    p.add_argument("--cards-per-terminal", type=int, help="cards each terminal uses; cards are shared by two")
    p.add_argument("--duration", type=float, help="seconds of load (with --transactions: the most it may take)")
    p.add_argument("--transactions", type=int, help="financial requests to send (0: run for --duration)")
    p.add_argument("--switch-kills", type=int, help="kill -9 of the switch, each followed by a restart")
    p.add_argument("--pg-kills", type=int, help="kill -9 of PostgreSQL's postmaster, each followed by a restart")
    p.add_argument("--pg-stops", type=int, help="SIGSTOP of every PostgreSQL process, then SIGCONT")
    p.add_argument("--pg-stop-s", type=float, default=REQUEST_TIMEOUT_S + 1.5,
                   help=f"how long PostgreSQL stays stopped (default {REQUEST_TIMEOUT_S + 1.5:g} s, longer than the"
                        f" switch's request_timeout_s = {REQUEST_TIMEOUT_S:g}); every second stop lasts the terminals'"
                        " timeout + 3 s, and every second kill of PostgreSQL keeps it down the timeout + 1 s, so that"
                        " reversals meet outages too")
    p.add_argument("--bank-kills", type=int, help="kill -9 of the bank simulator, restarted on the same journal")
    p.add_argument("--mid-frame-drops", type=int, help="connections that send half a frame and hang up")
    p.add_argument("--fuzz-frames", type=int, help="fuzzed frames to send (0: no fuzzer)")
    p.add_argument("--fuzz-rate", type=float, help="fuzzed frames a second at most")
    p.add_argument("--drain-timeout", type=float, help="seconds to wait for pending requests and reversals at the end")
    p.add_argument("--reversal-grace", type=float,
                   help="after the load, how long a terminal may still try to get its reversal answered")
    p.add_argument("--retransmit", type=float, default=0.05, help="share of answered requests sent again")
    p.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S + COMMIT_WAIT_S + 1.0,
                   help="the terminals' response timeout (default: request_timeout_s + commit_wait_s + 1)")
    p.add_argument("--seed", type=int, help="random seed (default: fresh; printed)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the switch's log level (info: one line per request, the evidence for findings)")
    p.add_argument("--keep", choices=["never", "failure", "always"], default="failure",
                   help="keep the campaign folder (logs, journals, database) (default: on failure)")
    p.add_argument("--pointswitch", type=Path, default=Path(sys.executable).parent / "pointswitch",
                   help="the pointswitch executable (default: the one beside this Python)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON on stdout (table on stderr)")
    return p


def options(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.preset = args.preset or "short"
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.terminals < 1 or args.cards_per_terminal < 1:
        parser.error("--terminals and --cards-per-terminal are at least 1")
    if args.duration <= 0 and args.transactions <= 0:
        parser.error("give a --duration or a number of --transactions")
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    return args


# -- the load under faults -----------------------------------------------------------------------
async def load_under_faults(args: argparse.Namespace, s: Setup) -> LoadResult:
    rng = random.Random(args.seed)
    progress = Progress(args.duration, args.transactions, args.fuzz_frames)
    journal: list[Entry] = []
    stats = Stats()
    hard_deadline: list[float] = []
    weights = {"accrue": 40, "redeem": 16, "void": 8, "refund": 6, "cash_out": 10, "insurance": 6, "inquiry": 4}
    cards = s.load_cards
    terminals = []
    for n, (tid, tmk) in enumerate(s.load_terminals.items()):
        # a handful of cards each, every card shared with other terminals: postings contend
        mine = [cards[(n * args.cards_per_terminal // 2 + k) % len(cards)] for k in range(args.cards_per_terminal)]
        terminals.append(CampaignTerminal(tid, MERCHANT, s.switch.port, tmk, PIN, mine, random.Random(rng.random()),
                                          weights=weights, retransmit=args.retransmit, timeout_s=args.timeout,
                                          rates=s.rates, stats=stats, journal=journal, hard_deadline=hard_deadline))
    fuzzer = None
    if args.fuzz_frames:
        fuzzer = Fuzzer(s.switch.port, MERCHANT, s.fuzz_terminals, s.fuzz_cards, PIN, random.Random(rng.random()),
                        frames=args.fuzz_frames, max_rate=args.fuzz_rate, progress=progress)
    plan = FaultPlan(args.switch_kills, args.pg_kills, args.pg_stops, args.bank_kills, args.mid_frame_drops,
                     pg_stop_s=args.pg_stop_s, pg_stop_long_s=args.timeout + 3.0, pg_down_long_s=args.timeout + 1.0)
    injector = Injector(plan, s.postgres, s.switch, [s.bank, s.insurer], terminals, fuzzer, progress,
                        random.Random(rng.random()))
    sampler = Sampler(s.switch, s.postgres)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C: the load is cancelled, then everything cleaned up
        loop.add_signal_handler(sig, main_task.cancel)
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            sampler.tick()
            try:
                await asyncio.wait_for(stop_sampling.wait(), sampler.period_s)
            except TimeoutError:
                pass

    async def report() -> None:
        last = 0
        while not progress.stopped:
            await asyncio.sleep(5.0)
            done = sum(1 for e in journal if e.final)
            say(f"load {100 * min(1.0, progress.fraction()):5.1f} %: {len(journal)} requests ({done - last} answered"
                f" in 5 s), faults {dict(injector.done)}"
                + (f", fuzzed frames {fuzzer.stats.frames}" if fuzzer else ""))
            last = done

    async def deadline() -> None:
        while progress.fraction() < 1.0:  # noqa: ASYNC110 - progress is time or a count, nothing to wait on
            await asyncio.sleep(0.1)
        progress.stopped = True
        hard_deadline.append(time.monotonic() + args.reversal_grace)
        say(f"load ends: {progress.sent} requests sent; terminals finish what they started"
            f" (reversals for up to {args.reversal_grace:g} s)")

    background = [loop.create_task(c) for c in (sample(), report(), deadline(), injector.watchdog())]
    faults = loop.create_task(injector.run())
    drops = loop.create_task(injector.drops())
    fuzzing = loop.create_task(fuzzer.run()) if fuzzer else None
    say(f"load: {len(terminals)} terminals, {len(cards)} cards, "
        + (f"{args.transactions} transactions (at most {args.duration:g} s)" if args.transactions
           else f"{args.duration:g} s")
        + f"; faults planned: {[k for _, k in plan.events()]}, {plan.mid_frame_drops} mid-frame drops,"
          f" {args.fuzz_frames} fuzzed frames; seed {args.seed}")
    try:
        await asyncio.gather(*(t.run(progress) for t in terminals))
        load_s = time.monotonic() - progress.started
        if fuzzer:
            fuzzer.stop()
        await asyncio.gather(faults, drops, *([fuzzing] if fuzzing else []))
        # everything healed: PostgreSQL continued and running, the switch and hosts up
        s.postgres.sigcont()
        async with injector.lock:
            pass
        injector.stop()
        await asyncio.sleep(0.3)
        say(f"load done in {load_s:.1f} s; draining: pending requests and upstream reversals")
        drain_started = time.monotonic()
        left = (-1, -1)
        while time.monotonic() - drain_started < args.drain_timeout:
            try:
                left = await drained(s.postgres.dsn)
            except Exception as exc:  # the database may still be coming back: try again
                say(f"drain: {type(exc).__name__}: {exc}")
                left = (-1, -1)
            if left == (0, 0):
                break
            await asyncio.sleep(0.5)
        drain_s = time.monotonic() - drain_started
        say(f"drained in {drain_s:.1f} s: {left[0]} pending requests, {left[1]} pending upstream reversals")
    finally:
        stop_sampling.set()
        injector.stop()
        for task in [*background, faults, drops, *([fuzzing] if fuzzing else [])]:
            task.cancel()
        await asyncio.gather(*background, faults, drops, *([fuzzing] if fuzzing else []), return_exceptions=True)
        s.postgres.sigcont()
    return LoadResult(journal, stats, injector, fuzzer, sampler, load_s, drain_s, left, injector.not_injected)


def campaign(args: argparse.Namespace, folder: Path, procs: Processes) -> tuple[int, str, dict[str, Any]]:
    started = time.monotonic()
    s = set_up(args, folder, procs)
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            load = runner.run(load_under_faults(args, s))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        install_interrupt_handlers()
    say("stopping the switch and the hosts (SIGTERM)")
    exit_codes = {"switch": s.switch.stop(), "bank": s.bank.stop(), "insurer": s.insurer.stop()}
    check = ledger_check(s, procs)
    with asyncio.Runner() as runner:
        rec = runner.run(reconcile(s.postgres.dsn, s.master_key, load.journal, set(s.load_terminals),
                                   [*s.load_cards, *s.fuzz_cards], s.rates,
                                   {"bank": folder / "bank.jsonl", "insurer": folder / "insurer.jsonl"}))
    write_journal(folder / "journal.jsonl", load.journal)
    memory = load.sampler.summary()
    say("stopping PostgreSQL")
    procs.cleanup()
    left = procs.left_behind(folder)
    checks = verdicts(rec, check, load, left, memory, exit_codes)
    table = render(args, s, load, rec, checks, time.monotonic() - started)
    details = evidence(rec, s, load)
    notable = log_summary(s.switch)
    if notable:
        details += "\n\nswitch log, warnings and errors by event (all starts):\n" + "\n".join(
            f"  {n:6d}  {event}" for event, n in notable.items())
    faults = "\n".join(f"  {time.strftime('%H:%M:%S', time.localtime(f.wall))}.{int(f.wall * 1000) % 1000:03d}"
                       f" +{f.at_s:7.2f}s  {f.kind:<15} {f.detail.splitlines()[0]}"
                       + (f"  (healed in {f.healed_s:.2f} s)" if f.healed_s is not None else "")
                       for f in load.injector.faults)
    details += "\n\nfaults, as injected:\n" + faults
    violations = sum(1 for _, _, bad in checks if bad)
    result = {"ok": violations == 0, "violations": violations, "seed": args.seed, "preset": args.preset,
              "checks": [{"check": c, "value": v, "violated": b} for c, v, b in checks],
              "requests": {k: v for k, v in summary(load.journal).items() if k != "contradictions"},
              "faults": dict(load.injector.done), "unplanned_exits": load.injector.unplanned,
              "fuzz": asdict(load.fuzzer.stats) if load.fuzzer else None, "memory": memory,
              "findings": [asdict(f) for f in rec.findings[:200]], "paid": rec.paid,
              "log_warnings_and_errors": notable}
    return (1 if violations else 0), table + "\n" + details, result


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    folder = Path(tempfile.mkdtemp(prefix="ps-faults-"))
    say.open(folder / "campaign.log")
    procs = Processes()
    code, report, result = 2, "", dict[str, Any]()
    try:
        with interruptible():
            try:
                code, report, result = campaign(args, folder, procs)
            finally:
                procs.cleanup()
    except CampaignError as exc:
        say(f"CAMPAIGN FAILED: {exc}")
        code = 2
    except Exception:  # the campaign's own defect: shown, and not mistaken for a finding
        say(f"CAMPAIGN FAILED:\n{traceback.format_exc()}")
        code = 2
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    finally:
        keep = args.keep == "always" or (args.keep == "failure" and code != 0)
        say.close()
        if keep:
            print(f"[faults] kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    if report:
        print(report, file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json and result:
        print(json.dumps(result, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
