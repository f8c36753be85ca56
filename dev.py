#!/usr/bin/env python3
"""Bootstrap for a fresh machine with nothing but Python 3.11+.

    python3 dev.py demo     the switch on an embedded PostgreSQL, with the demo scenario
    python3 dev.py test     lint and the whole test suite
    python3 dev.py bench    the benchmark (bench/throughput.py)
    python3 dev.py faults   the fault campaign (bench/faults.py; --short, --long, --help)
    python3 dev.py close-bench   what closing a day of 1M postings costs (bench/close_day.py)
    python3 dev.py targets  the hot path's targets in one run (bench/targets.py)
    python3 dev.py profile  where the switch's CPU goes, by step (bench/profile.py; needs py-spy)
    python3 dev.py -- ARGS  any pointswitch command, e.g. python3 dev.py -- serve

Creates .venv/ beside this file on first use (and again when pyproject.toml
changes), installs the project into it, then runs the command there.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("POINTSWITCH_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".pointswitch-installed"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py itself must run on any Python 3
        sys.exit(f"pointswitch needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and (BIN / "python").exists():
        return
    if not (BIN / "python").exists():
        print(f"creating virtual environment in {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing pointswitch and its dependencies ...", flush=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


def run(*cmd: str) -> int:
    return subprocess.run(list(cmd), cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    ensure_venv()
    what, rest = argv[0], argv[1:]
    if what == "demo":
        return run(str(BIN / "pointswitch"), "demo", *rest)
    if what == "test":
        for step in (
            [str(BIN / "ruff"), "check", *(p for p in ("src", "tests", "bench", "dev.py") if (ROOT / p).exists())],
            [str(BIN / "mypy"), "src/pointswitch"],
            [str(BIN / "python"), "-m", "pytest", *rest],
        ):
            code = run(*step)
            if code != 0:
                print(f"dev.py test: {Path(step[0]).name} failed (exit {code})")
                return code
        return 0
    if what == "bench":
        return run(str(BIN / "python"), "bench/throughput.py", *rest)
    if what == "faults":
        return run(str(BIN / "python"), "bench/faults.py", *rest)
    if what == "close-bench":
        return run(str(BIN / "python"), "bench/close_day.py", *rest)
    if what == "targets":
        return run(str(BIN / "python"), "bench/targets.py", *rest)
    if what == "profile":
        return run(str(BIN / "python"), "bench/profile.py", *rest)
    if what == "--":
        return run(str(BIN / "pointswitch"), *rest)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
