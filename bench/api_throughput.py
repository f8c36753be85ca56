#!/usr/bin/env python3
"""Accruals through the JSON API next to accruals through the ISO listener: one
switch, one database, one machine, one run.

    .venv/bin/python bench/api_throughput.py                     # 8 clients each, 15 s each
    .venv/bin/python bench/api_throughput.py --connections 4 --duration 10 --json

One run:

1. a temporary folder with a fresh embedded PostgreSQL server;
2. ``pointswitch serve`` (one ``cup`` listener, the web layer on a free port);
3. ``admin seed`` with twice ``--connections`` terminals: the first half stay POS
   terminals, the second half get API keys (``admin terminal api-key``);
4. ISO: ``sim load --mix accrue=100`` over ``--connections`` TCP connections;
5. API: ``--connections`` HTTP clients (keep-alive, one request outstanding each,
   as the ISO load), each an API terminal signing its requests with a fresh
   Idempotency-Key per accrual, for the same duration;
6. a report: requests/s, p50/p99 of each, and the CPU of the switch, PostgreSQL and
   the load generators (a load generator near 100 % of a core is the limit, not the switch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import BenchError, CpuMeter, clean_env, free_port, machine, run, say  # noqa: E402
from parties import Build, Postgres, Switch  # noqa: E402
from throughput import run_load  # noqa: E402

FIRST_CARD = 6288990000000000  # admin seed's first load card


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="api_throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=8, help="ISO connections, and API clients (default 8)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of each load (default 15)")
    p.add_argument("--cards", type=int, default=2000, help="load cards to seed (default 2000)")
    p.add_argument("--pin", default="123456")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the switch's log level (default info: one line per transaction, as in production)")
    p.add_argument("--pointswitch", type=Path, default=Path(sys.executable).parent / "pointswitch")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON object on stdout")
    return p


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def api_load(base: str, keys: dict[str, bytes], cards: int, duration_s: float) -> dict[str, Any]:
    """One client per API terminal, one accrual outstanding each, for ``duration_s``."""
    import aiohttp

    from pointswitch.web.api.guard import sign

    latencies_ms: list[float] = []
    codes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    rng = random.Random(7)
    deadline = time.monotonic() + duration_s
    path = "/api/v1/accrue"

    async def client(http: aiohttp.ClientSession, terminal: str, key: bytes) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            body = json.dumps({"card": str(FIRST_CARD + rng.randrange(cards)),
                               "amount_fen": rng.randrange(100, 20000)}).encode()
            ts, idem = str(int(time.time())), f"{terminal}-{n}"
            headers = {"Content-Type": "application/json", "X-Terminal": terminal, "X-Timestamp": ts,
                       "Idempotency-Key": idem, "X-Signature": sign(key, "POST", path, ts, idem, body)}
            started = time.perf_counter()
            try:
                async with http.post(base + path, data=body, headers=headers) as resp:
                    answer = await resp.json(content_type=None)
                latencies_ms.append((time.perf_counter() - started) * 1000)
                codes[f"{resp.status}:{answer.get('code')}"] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                errors[type(exc).__name__] += 1

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=len(keys))
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(http, t, k) for t, k in keys.items()))
    elapsed = time.monotonic() - started
    return {
        "requests": len(latencies_ms), "elapsed_s": round(elapsed, 2),
        "throughput_rps": round(len(latencies_ms) / elapsed, 1) if elapsed else 0.0,
        "latency_ms_p50": round(percentile(latencies_ms, 0.50), 2),
        "latency_ms_p99": round(percentile(latencies_ms, 0.99), 2),
        "latency_ms_mean": round(statistics.fmean(latencies_ms), 2) if latencies_ms else 0.0,
        "codes": dict(codes), "errors": dict(errors),
    }


def measure_api(switch: Switch, pg: Postgres, http_port: int, keys: dict[str, bytes], args: argparse.Namespace
                ) -> dict[str, Any]:
    meter = CpuMeter(pg, switch.pid)
    me = psutil.Process()
    before = sum(me.cpu_times()[:2])
    report = asyncio.run(api_load(f"http://127.0.0.1:{http_port}", keys, args.cards, args.duration))
    cpu = meter.finish()
    generator = (sum(me.cpu_times()[:2]) - before) / max(report["elapsed_s"], 1e-9) * 100
    # This process is the API's load generator: the meter counts it under "other".
    report["cpu_percent_of_one_core"] = {"switch": cpu["switch"], "load_generator": round(generator, 1),
                                         "postgres": cpu["postgres"],
                                         "other": round(max(0.0, cpu["other"] - generator), 1)}
    return report


def benchmark(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    env = clean_env(secrets.token_hex(16).upper())
    build = Build.inspect(args.pointswitch, env)
    pg = Postgres(folder / "db")
    switch: Switch | None = None
    n = args.connections
    try:
        say(f"starting embedded PostgreSQL in {pg.folder}")
        pg.start()
        switch = Switch(build, pg.dsn, folder, env, args.log_level)
        http_port = free_port()
        env["POINTSWITCH_HTTP_PORT"] = str(http_port)  # clean_env's free-port default would override the file
        rate = n * 10_000  # the per-key rate limit is not what is measured
        switch.start(extra_config=f'\n[http]\nport = {http_port}\n\n[api]\nrequests_per_s_per_key = {rate}\n'
                                  f'burst_per_key = {rate}\nmax_requests_in_flight = {max(64, 4 * n)}\n')
        say(f"switch: ISO on 127.0.0.1:{switch.port}, HTTP on 127.0.0.1:{http_port} (pid {switch.pid})")
        seed = json.loads(run(switch.command("admin", "seed", "--json", "--dsn", pg.dsn, "--terminals", str(2 * n),
                                             "--cards", str(args.cards), "--pin", "-"),
                              env=env, timeout=600, stdin=args.pin + "\n"))
        keys = {}
        for i in range(n + 1, 2 * n + 1):
            terminal = f"L{i:07d}"
            issued = json.loads(run(switch.command("admin", "terminal", "api-key", terminal, "--json", "--dsn",
                                                   pg.dsn), env=env, timeout=120))
            keys[terminal] = bytes.fromhex(issued["api_key"])
        say(f"ISO: {n} connections, {args.duration:g} s of accruals")
        args.mix, args.depth = "accrue=100", 1
        iso = run_load(switch, pg, args, seed.get("tmk"))
        say(f"ISO: {iso.get('throughput_tps')} req/s; API: {n} clients, {args.duration:g} s of accruals")
        api = measure_api(switch, pg, http_port, keys, args)
        say(f"API: {api['throughput_rps']} req/s")
        exit_code = switch.stop()
    finally:
        if switch is not None and switch.alive():
            switch.stop(grace_s=10)
        pg.stop()
    iso_cpu = iso.get("cpu_percent_of_one_core", {})
    return {
        "machine": {**machine(), "postgresql": pg.version},
        "settings": {"connections": n, "duration_s": args.duration, "cards": args.cards,
                     "switch_log_level": args.log_level, "commit": build.commit},
        "iso": {"throughput_rps": iso.get("throughput_tps"), "latency_ms_p50": iso.get("latency_ms_p50"),
                "latency_ms_p99": iso.get("latency_ms_p99"), "codes": iso.get("response_codes"),
                "errors": iso.get("errors"),
                "cpu_percent_of_one_core": {k: iso_cpu.get(k) for k in ("switch", "load_generator", "postgres",
                                                                         "other")}},
        "api": api,
        "switch_exit_code": exit_code,
    }


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"machine: {m['cores']} cores, {m['cpu']}, {m['ram_gib']} GiB; PostgreSQL {m['postgresql']}",
             f"settings: {r['settings']}", f"{'':<5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}   CPU % of one core"]
    for name in ("iso", "api"):
        x = r[name]
        lines.append(f"{name.upper():<5} {x['throughput_rps']:>9} {x['latency_ms_p50']:>8} {x['latency_ms_p99']:>8}"
                     f"   {x['cpu_percent_of_one_core']}")
        lines.append(f"{'':<5} codes {x.get('codes')} errors {x.get('errors')}")
    lines.append(f"switch exit code {r['switch_exit_code']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.connections < 1 or args.duration <= 0:
        raise SystemExit("--connections >= 1 and --duration > 0")
    with tempfile.TemporaryDirectory(prefix="pointswitch-api-bench-") as tmp:
        try:
            result = benchmark(args, Path(tmp))
        except BenchError as exc:
            say(f"benchmark failed: {exc}")
            return 1
    print(render(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    ok = result["switch_exit_code"] == 0 and not result["api"]["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
