"""Setting up a fault campaign (``bench/faults.py``): the embedded PostgreSQL server, the
bank and insurer simulators, the switch's configuration and process, the seeded network."""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from measure import clean_env

from campaign.common import CampaignError, free_port, say
from campaign.processes import Postgres, Processes, Service
from campaign.terminals import Rates

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
