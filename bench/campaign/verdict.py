"""The end of a fault campaign (``bench/faults.py``): the ledger's own check, the switch's
log read for evidence, the verdicts, and the table a person reads."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from campaign.fuzz import Fuzzer
from campaign.processes import Processes, Sampler, Service
from campaign.reconcile import Reconciliation
from campaign.schedule import Injector
from campaign.setup import (
    FD_GROWTH,
    REQUEST_TIMEOUT_S,
    RSS_GROWTH_MIB,
    Setup,
    run_command,
)
from campaign.terminals import Entry, Stats, summary

PRESETS: dict[str, dict[str, Any]] = {
    "short": dict(terminals=10, cards_per_terminal=4, duration=42.0, transactions=0, switch_kills=3, pg_kills=2,
                  pg_stops=2, bank_kills=2, mid_frame_drops=10, fuzz_frames=10000, fuzz_rate=500.0, drain_timeout=20.0,
                  reversal_grace=15.0),
    "long": dict(terminals=24, cards_per_terminal=4, duration=5400.0, transactions=100_000, switch_kills=20,
                 pg_kills=5, pg_stops=5, bank_kills=5, mid_frame_drops=100, fuzz_frames=1_000_000, fuzz_rate=4000.0,
                 drain_timeout=120.0, reversal_grace=60.0),
}


@dataclass
class LoadResult:
    """What the load under faults leaves for the end to judge."""

    journal: list[Entry]
    stats: Stats
    injector: Injector
    fuzzer: Fuzzer | None
    sampler: Sampler
    load_s: float
    drain_s: float
    drained: tuple[int, int]
    faults_left: list[str] = field(default_factory=list)


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
