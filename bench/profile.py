#!/usr/bin/env python3
"""Where the switch's CPU goes, step by step: py-spy on ``pointswitch serve`` under load.

    .venv/bin/python bench/profile.py                                  # accruals, 8 connections x depth 4
    .venv/bin/python bench/profile.py --mix accrue=80,inquiry=10,redeem=10 --seconds 20
    .venv/bin/python bench/profile.py --pointswitch /other/build/.venv/bin/pointswitch --json

Runs ``bench/throughput.py`` (which brings its own PostgreSQL and load), attaches
``py-spy record`` to the switch's process once it listens, and sorts every sample
into the step of the request pipeline its innermost recognised frame belongs to.
The same rules apply to any build, so two builds compare step by step.

py-spy is a tool, not a dependency of the project: ``.venv/bin/pip install py-spy``.
It needs permission to read the switch's memory (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (step, pattern on "function (file:line)" frames), first match from the innermost frame wins.
STEPS: list[tuple[str, re.Pattern[str]]] = [
    ("MAC and keys (codecs.crypto, cryptography)", re.compile(r"codecs/crypto\.py|cryptography/")),
    ("PIN verification (ledger.pins)", re.compile(r"ledger/pins\.py")),
    ("logging (structlog, masking)", re.compile(r"structlog/|pointswitch/logs\.py")),
    ("decode and encode (codecs, pyiso8583)", re.compile(r"pointswitch/codecs/|iso8583/")),
    ("decide (ledger.decide)", re.compile(r"ledger/decide\.py")),
    ("group commit (ledger.group, ledger.gate)", re.compile(r"ledger/group\.py|ledger/gate\.py")),
    ("ledger, one transaction each (ledger.*)", re.compile(r"pointswitch/ledger/")),
    ("database driver (asyncpg)", re.compile(r"asyncpg/")),
    ("authentication and sessions (routing.auth, ledger.sessions)", re.compile(r"routing/auth\.py")),
    ("routing (fields to commands, responses)", re.compile(r"pointswitch/routing/")),
    ("request handling (switch.handler, switch.guard)", re.compile(r"switch/handler\.py|switch/guard\.py")),
    ("connections and framing (switch.server)", re.compile(r"pointswitch/switch/")),
    ("metrics (prometheus_client)", re.compile(r"prometheus_client/")),
    ("event loop (uvloop, asyncio)", re.compile(r"uvloop|asyncio/")),
]
OTHER = "other"


def step_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for step, pattern in STEPS:
            if pattern.search(frame):
                return step
    return OTHER


def breakdown(raw: str) -> tuple[Counter[str], Counter[str], int]:
    """Samples per step, and per innermost frame, from py-spy's raw (collapsed) output:
    ``frame;frame;... count``."""
    steps: Counter[str] = Counter()
    frames: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        steps[step_of(stack)] += int(count)
        frames[re.sub(r":\d+\)$", ")", stack.split(";")[-1])] += int(count)
        total += int(count)
    return steps, frames, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pointswitch", default=str(Path(sys.executable).parent / "pointswitch"))
    p.add_argument("--mix", default="accrue=100")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seconds", type=int, default=15, help="seconds of samples (the load runs 5 s longer)")
    p.add_argument("--rate", type=int, default=200, help="samples a second")
    p.add_argument("--top", type=int, default=0, help="also the N functions with the most samples of their own")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    bench = subprocess.Popen(
        [sys.executable, str(HERE / "throughput.py"), "--pointswitch", args.pointswitch, "--mix", args.mix,
         "--connections", str(args.connections), "--depth", str(args.depth), "--duration", str(args.seconds + 5),
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert bench.stderr is not None and bench.stdout is not None
    pid: int | None = None
    lines: list[str] = []
    for line in bench.stderr:
        lines.append(line)
        found = re.search(r"switch listening on \S+ \(pid (\d+)\)", line)
        if found:
            pid = int(found.group(1))
        if pid and "load:" in line:
            break
    if pid is None:
        bench.wait()
        print("".join(lines[-20:]), file=sys.stderr)
        return 2
    rest: list[str] = []
    drain = threading.Thread(target=lambda: rest.extend(bench.stderr or []), daemon=True)
    drain.start()
    time.sleep(2)  # past the load generator's connecting and signing on
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "samples.txt"
        subprocess.run([spy, "record", "-r", str(args.rate), "-d", str(args.seconds), "-p", str(pid), "-f", "raw",
                        "-o", str(out)], check=True, capture_output=True)
        raw = out.read_text()
    result = json.loads(bench.stdout.read() or "{}")
    bench.wait()
    steps, frames, total = breakdown(raw)
    report = {"build": result.get("build", {}).get("commit"), "mix": args.mix,
              "throughput_tps": result.get("load", {}).get("throughput_tps"), "samples": total,
              "steps_percent": {s: round(100 * n / max(total, 1), 1) for s, n in steps.most_common()}}
    print(f"py-spy, {total} samples at {args.rate}/s over {args.seconds} s; build {report['build']};"
          f" mix {args.mix}; {report['throughput_tps']} req/s during the run", file=sys.stderr)
    for step, share in report["steps_percent"].items():
        print(f"  {share:5.1f} %  {step}", file=sys.stderr)
    for frame, n in frames.most_common(args.top):
        print(f"  {100 * n / max(total, 1):5.1f} %  self  {frame}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
