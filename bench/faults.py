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
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from campaign.common import CampaignError, free_port, say
from campaign.fuzz import Fuzzer
from campaign.processes import Postgres, Processes, Sampler, Service, install_interrupt_handlers, interruptible
from campaign.reconcile import Reconciliation, drained, reconcile
from campaign.schedule import FaultPlan, Injector
from campaign.terminals import CampaignTerminal, Entry, Progress, Rates, Stats, summary, write_journal
from measure import clean_env

MERCHANT = "MFAULT000000001"
LOAD_PREFIX = "F"
FUZZ_PREFIX = "Z"
FIRST_CARD = 6288990000000000
FUZZ_FIRST_CARD = 6288997000000000
PIN = "123456"
REQUEST_TIMEOUT_S = 2.0
COMMIT_WAIT_S = 2.0
UPSTREAM_TIMEOUT_S = 0.8
RSS_GROWTH_MIB = 32.0  # first third against last third: more than this (and 30 %) is a leak
FD_GROWTH = 64

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


# -- setting up ----------------------------------------------------------------------------------
def knows_commit_wait(exe: Path, env: dict[str, str]) -> bool:
    """Whether the build under test has [limits] commit_wait_s (builds before "an answer never lies"
    refuse it): so that the same campaign runs against an older build for comparison."""
    first = exe.read_bytes()[:300].split(b"\n", 1)[0].decode(errors="replace")
    python = first[2:].strip() if first.startswith("#!") else sys.executable
    probe = "import pointswitch.config as c; print('commit_wait_s' in c.Limits.__dataclass_fields__)"
    result = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    return result.stdout.strip() == "True"


def switch_config(port: int, bank_port: int, insurer_port: int, rates: Rates, *, commit_wait: bool = True) -> str:
    connector = (f"response_timeout_s = {UPSTREAM_TIMEOUT_S}\nbackoff_initial_s = 0.2\nbackoff_max_s = 2.0\n"
                 "reversal_retry_s = 0.5\nreversal_retry_max_s = 4.0\necho_interval_s = 5.0\necho_timeout_s = 2.0\n")
    return f"""# written by bench/faults.py
[[listener]]
name = "cup"
host = "127.0.0.1"
port = {port}
dialect = "cup"
framing = "binary2"

[limits]
request_timeout_s = {REQUEST_TIMEOUT_S}
{f"commit_wait_s = {COMMIT_WAIT_S}" if commit_wait else "# (this build has no commit_wait_s)"}
shutdown_grace_s = 5.0

[database]
command_timeout_s = 5.0

# The fuzzer's mutated frames fail their MAC by the thousand; the guard that bans such peers and
# withdraws such terminals' keys is tested by tests/test_hostile.py, and here it would only stop the
# fuzzer from reaching the parser and the router.
[security]
max_mac_failures_per_peer = 1000000000
max_mac_failures_per_terminal = 1000000000

[[connector]]
name = "bank"
port = {bank_port}
{connector}
[[connector]]
name = "insurer"
port = {insurer_port}
{connector}
[cash_out]
connector = "bank"
points_per_yuan = "{rates.cash_points_per_yuan}"
fee_points = {rates.cash_fee_points}
min_amount_fen = 100
daily_limit_fen = 1000000000

[insurance]
connector = "insurer"
points_per_yuan = "{rates.premium_points_per_yuan}"
fee_points = {rates.premium_fee_points}
min_amount_fen = 100
daily_limit_fen = 1000000000
"""


def run_command(cmd: list[str], env: dict[str, str], procs: Processes, *, stdin: str | None = None,
                timeout_s: float = 120.0, check: bool = True) -> tuple[int, str, str]:
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    procs.commands.append(proc)
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CampaignError(f"{' '.join(cmd[1:4])}: not done within {timeout_s:.0f} s") from None
    if check and proc.returncode != 0:
        raise CampaignError(f"{' '.join(cmd[1:4])} exited {proc.returncode}: {(err or out).strip()[-800:]}")
    return proc.returncode, out, err


@dataclass
class Setup:
    folder: Path
    exe: Path
    env: dict[str, str]
    master_key: str
    postgres: Postgres
    switch: Service
    bank: Service
    insurer: Service
    load_terminals: dict[str, bytes]
    fuzz_terminals: dict[str, bytes]
    load_cards: list[str]
    fuzz_cards: list[str]
    rates: Rates
    startup_s: float = 0.0


def set_up(args: argparse.Namespace, folder: Path, procs: Processes) -> Setup:
    started = time.monotonic()
    exe = args.pointswitch.absolute()
    if not exe.exists():
        raise CampaignError(f"{exe} does not exist (--pointswitch)")
    master_key = secrets.token_hex(32)
    env = clean_env(master_key)
    rates = Rates()
    say(f"starting embedded PostgreSQL in {folder / 'db'}")
    pg = Postgres(folder / "db")
    procs.postgres = pg
    pg.start()
    say(f"PostgreSQL ready (postmaster pid {pg.postmaster_pid()})")

    n_cards = max(args.cards_per_terminal, args.terminals * args.cards_per_terminal // 2)
    db = ["--dsn", pg.dsn, "--json"]
    # the PIN on standard input; builds from before that took it on the command line
    on_stdin = "standard input" in " ".join(run_command([str(exe), "admin", "seed", "--help"], env, procs)[1].split())
    pin = (["--pin", "-"], PIN + "\n") if on_stdin else (["--pin", PIN], None)
    seeded = json.loads(run_command(
        [str(exe), "admin", "seed", *db, "--merchant", MERCHANT, "--earn-rate", str(rates.earn_rate),
         "--terminals", str(args.terminals), "--terminal-prefix", LOAD_PREFIX, "--cards", str(n_cards),
         "--first-card", str(FIRST_CARD), *pin[0]], env, procs, stdin=pin[1])[1])
    fuzzed = json.loads(run_command(
        [str(exe), "admin", "seed", *db, "--merchant", MERCHANT, "--terminals", "2", "--terminal-prefix", FUZZ_PREFIX,
         "--cards", "8", "--first-card", str(FUZZ_FIRST_CARD), *pin[0]], env, procs, stdin=pin[1])[1])
    if not seeded.get("tmk") or not fuzzed.get("tmk"):
        raise CampaignError(f"admin seed printed no terminal master key: {seeded} {fuzzed}")
    say(f"seeded {args.terminals} load terminals and {n_cards} cards, 2 fuzzer terminals and 8 cards")

    bank_port, insurer_port, port = free_port(), free_port(), free_port()
    services = {}
    for name, host_port in (("bank", bank_port), ("insurer", insurer_port)):
        service = Service(name, [str(exe), "sim", name, "--port", str(host_port), "--ledger",
                                 str(folder / f"{name}.jsonl")], host_port, folder, env)
        procs.services.append(service)
        service.start()
        services[name] = service
    config = folder / "switch.toml"
    commit_wait = knows_commit_wait(exe, env)
    if not commit_wait:
        say("this build has no [limits] commit_wait_s: an older build, run for comparison")
    config.write_text(switch_config(port, bank_port, insurer_port, rates, commit_wait=commit_wait))
    switch = Service("switch", [str(exe), "serve", "--config", str(config), "--dsn", pg.dsn,
                                "--log-level", args.log_level], port, folder, env)
    procs.services.append(switch)
    switch.start()
    say(f"switch listening on 127.0.0.1:{port} (pid {switch.pid}); bank on {bank_port}, insurer on {insurer_port}")

    def ids(prefix: str, n: int) -> list[str]:
        return [f"{prefix}{i:0{8 - len(prefix)}d}" for i in range(1, n + 1)]

    return Setup(folder, exe, env, master_key, pg, switch, services["bank"], services["insurer"],
                 {t: bytes.fromhex(seeded["tmk"]) for t in ids(LOAD_PREFIX, args.terminals)},
                 {t: bytes.fromhex(fuzzed["tmk"]) for t in ids(FUZZ_PREFIX, 2)},
                 [str(FIRST_CARD + i) for i in range(n_cards)], [str(FUZZ_FIRST_CARD + i) for i in range(8)],
                 rates, time.monotonic() - started)


# -- the load under faults -----------------------------------------------------------------------
@dataclass
class LoadResult:
    journal: list[Entry]
    stats: Stats
    injector: Injector
    fuzzer: Fuzzer | None
    sampler: Sampler
    load_s: float
    drain_s: float
    drained: tuple[int, int]
    faults_left: list[str] = field(default_factory=list)


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


# -- the end -------------------------------------------------------------------------------------
def ledger_check(s: Setup, procs: Processes) -> dict[str, Any]:
    code, out, err = run_command([str(s.exe), "admin", "check", "--json", "--dsn", s.postgres.dsn], s.env, procs,
                                 check=False)
    try:
        result: dict[str, Any] = json.loads(out)
    except ValueError:
        result = {"ok": False, "problems": [f"admin check exited {code}: {(err or out).strip()[-300:]}"]}
    return result


def log_lines(service: Service, keys: set[str], limit: int = 8) -> dict[str, list[str]]:
    """The switch's log lines of some requests (by terminal and trace), across all its starts: one
    pass over the logs, however many requests."""
    wanted: dict[tuple[str, int], str] = {}
    for key in keys:
        parts = key.split(":")
        if len(parts) == 3 and parts[2].isdigit():
            wanted[(parts[0], int(parts[2]))] = key
    found: dict[str, list[str]] = {key: [] for key in keys}
    pattern = re.compile(r'"terminal": "([^"]*)", "trace": "?([0-9]+)')
    for path in service.logs():
        try:
            with path.open(errors="replace") as f:
                for line in f:
                    match = pattern.search(line)
                    hit = wanted.get((match.group(1), int(match.group(2)))) if match else None
                    if hit is not None and len(found[hit]) < limit:
                        found[hit].append(f"{path.name}: {line.strip()[:400]}")
        except OSError:
            continue
    return found


def log_summary(service: Service) -> dict[str, int]:
    """Warnings and errors of every start of the switch, by event."""
    notable: Counter[str] = Counter()
    for path in service.logs():
        try:
            with path.open(errors="replace") as f:
                for line in f:
                    if '"level": "warning"' not in line and '"level": "error"' not in line and "Traceback" not in line:
                        continue
                    match = re.search(r'"event": "([^"]*)"', line)
                    level = "error" if '"level": "error"' in line else "warning"
                    notable[f"{level}: {match.group(1) if match else line.strip()[:80]}"] += 1
        except OSError:
            continue
    return dict(notable.most_common(25))


VIOLATIONS = [
    # (category, table label)
    ("approval_without_posting", "approvals without posting (told 00, not posted)"),
    ("posting_without_approval", "postings without approval (posted, not told 00)"),
    ("request_points", "requests whose posting differs from the answer"),
    ("answer_points", "answers whose points differ from the rules"),
    ("card_balance", "cards whose balance differs from the journals"),
    ("reversal_not_recorded", "reversals answered but not remembered"),
    ("contradiction", "retransmissions answered differently"),
    ("paid_vs_credited", "upstream references paid != credited"),
    ("stuck", "stuck (pending, reversals never answered)"),
]


def verdicts(rec: Reconciliation, check: dict[str, Any], load: LoadResult, left: list[str],
             memory: dict[str, Any], exit_codes: dict[str, int | None]) -> list[tuple[str, str, bool]]:
    """(label, value, violated) for each line of the table's check section."""
    rows: list[tuple[str, str, bool]] = []
    for category, label in VIOLATIONS:
        n = rec.count(category)
        value = str(n)
        if category == "card_balance":
            value = f"{n} (points lost {rec.points_lost}, doubled {rec.points_doubled})"
        if category == "contradiction" and n:
            pairs = Counter(f"{e.answers[0]} then {e.answers[-1]}" for e in load.journal
                            if e.contradiction and e.op != "inquiry")
            value = f"{n} ({', '.join(f'{k}: {v}' for k, v in pairs.most_common())})"
        if category == "stuck":
            value = (f"{n} (pending requests {rec.pending_requests}, upstream reversals pending"
                     f" {rec.pending_reversals} expired {rec.expired_reversals})")
        rows.append((label, value, n > 0))
    for connector, paid in rec.paid.items():
        rows.append((f"paid out = credited, {connector}",
                     f"switch {paid['switch_fen']} fen, host {paid['host_fen']} fen ({paid['references']} legs)",
                     paid["switch_fen"] != paid["host_fen"]))
    problems = check.get("problems", [])
    rows.append(("ledger invariants (admin check)", "hold" if check.get("ok") else "; ".join(problems)[:200],
                 not check.get("ok")))
    unplanned = load.injector.unplanned
    rows.append(("processes that exited by themselves", str(len(unplanned)), bool(unplanned)))
    bad_exit = {k: v for k, v in exit_codes.items() if v != 0}
    rows.append(("exit codes on SIGTERM at the end", ", ".join(f"{k} {v}" for k, v in exit_codes.items()),
                 bool(bad_exit)))
    rows.append(("processes left behind", str(len(left)) + (f": {left[:3]}" if left else ""), bool(left)))
    if memory.get("enough"):
        grew = memory["rss_mib_last"] - memory["rss_mib_first"]
        leak = grew > max(RSS_GROWTH_MIB, 0.3 * memory["rss_mib_first"])
        fds = memory["fds_last"] - memory["fds_first"]
        rows.append(("switch RSS, first third -> last third",
                     f"{memory['rss_mib_first']} -> {memory['rss_mib_last']} MiB (peak {memory['rss_mib_peak']})",
                     leak))
        rows.append(("switch open descriptors, first -> last third",
                     f"{memory['fds_first']:g} -> {memory['fds_last']:g} (peak {memory['fds_peak']})",
                     fds > FD_GROWTH))
    else:
        rows.append(("switch RSS and descriptors", f"too few samples ({memory.get('steady_samples', 0)})", False))
    if load.faults_left:
        rows.append(("faults planned but not injected", ", ".join(load.faults_left), True))
    return rows


def render(args: argparse.Namespace, s: Setup, load: LoadResult, rec: Reconciliation,
           checks: list[tuple[str, str, bool]], total_s: float) -> str:
    info = summary(load.journal)
    inj, fz = load.injector, load.fuzzer
    by_op = "  ".join(f"{k} {v}" for k, v in info["by_op"].items())
    codes = "  ".join(f"{k} {v}" for k, v in info["codes"].items())
    unplanned = len(inj.unplanned)
    width = 52
    lines = [
        f"pointswitch fault campaign ({args.preset}): {total_s:.1f} s, seed {args.seed}",
        f"  {'setting':<{width}} {args.terminals} terminals, {len(s.load_cards)} cards"
        f" ({args.cards_per_terminal} each), load {load.load_s:.1f} s, start-up {s.startup_s:.1f} s,"
        f" drain {load.drain_s:.1f} s",
        f"  {'requests':<{width}} {info['requests']} ({by_op})",
        f"  {'final answers':<{width}} {codes}",
        f"  {'approved / declined (financial)':<{width}} {info['approved']} / {info['declined']}",
        f"  {'unanswered -> reversed / unresolved':<{width}} {info['unanswered']} -> {info['reversed']} /"
        f" {info['unresolved']} (reversals repeated {info['reversal_repeats']} times)",
        f"  {'retransmissions':<{width}} {info['retransmissions']}",
        f"  {'terminal connections / sign-ons':<{width}} {load.stats.connects} / "
        + " ".join(f"{k}:{v}" for k, v in sorted(load.stats.sign_ons.items()))
        + f" (late answers discarded {load.stats.late_answers})",
        f"  {'faults: switch kill -9 + restart':<{width}} {inj.done['switch_kill']}",
        f"  {'faults: PostgreSQL kill -9 + restart':<{width}} {inj.done['pg_kill']} (down 0.5 s, every second one"
        f" {args.timeout + 1.0:g} s)",
        f"  {'faults: PostgreSQL SIGSTOP':<{width}} {inj.done['pg_stop']} ({args.pg_stop_s:g} s, every second one"
        f" {args.timeout + 3.0:g} s; request_timeout_s {REQUEST_TIMEOUT_S:g}, terminals' timeout {args.timeout:g} s)",
        f"  {'faults: bank simulator kill -9 + restart':<{width}} {inj.done['bank_kill']}",
        f"  {'faults: connections dropped mid-frame':<{width}} {inj.done['mid_frame_drop']}"
        f" ({info['dropped_mid_frame']} by terminals, {fz.stats.half_frames if fz else 0} raw)",
        f"  {'faults: fuzzed frames':<{width}} "
        + (f"{fz.stats.frames} on {fz.stats.connections} connections "
           f"({', '.join(f'{k} {v}' for k, v in fz.stats.kinds.most_common())}); switch closed"
           f" {fz.stats.closed_by_switch}" if fz else "0"),
        f"  {'switch restarts by the campaign (it exited by itself)':<{width}} {unplanned}",
        f"  {'ledger rows / checked against a journal':<{width}} {rec.rows} / {rec.checked_requests}"
        f" (fuzzer's rows {rec.fuzzer_rows}); cards {rec.cards_checked}",
        "  " + "-" * (width + 40),
    ]
    for label, value, bad in checks:
        lines.append(f"  {label:<{width}} {value:<34} {'VIOLATION' if bad else 'ok'}")
    violations = sum(1 for _, _, bad in checks if bad)
    lines.append("  " + "-" * (width + 40))
    lines.append("  result" + " " * (width - 5) + ("OK" if not violations else f"FAILED: {violations} checks violated"))
    return "\n".join(lines)


def evidence(rec: Reconciliation, s: Setup, load: LoadResult, per_category: int = 6) -> str:
    """What was found, with the journal entry and the switch's log lines of each request."""
    if not rec.findings and not load.injector.unplanned:
        return ""
    journal = {e.key: e for e in load.journal}
    out = ["", "findings (first of each kind):"]
    shown: Counter[str] = Counter()
    chosen = []
    for f in rec.findings:
        shown[f.category] += 1
        if shown[f.category] <= per_category:
            chosen.append(f)
    lines = log_lines(s.switch, {f.key for f in chosen if f.key in journal})
    for f in chosen:
        out.append(f"- [{f.category}] {f.key}: {f.detail}")
        entry = journal.get(f.key)
        if entry is not None:
            out.append(f"    journal: answers {entry.answers} final {entry.final} reversal answers"
                       f" {entry.reversal_answers[-6:]} sent {time.strftime('%H:%M:%S', time.localtime(entry.sent_at))}"
                       f"{' dropped mid-frame' if entry.dropped_mid_frame else ''}")
            for line in lines.get(f.key, []):
                out.append(f"    {line}")
    more = {k: v - per_category for k, v in shown.items() if v > per_category}
    if more:
        out.append(f"  (and more: {more})")
    for note in load.injector.unplanned:
        out.append(f"- [unplanned exit] {note}")
    return "\n".join(out)


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
