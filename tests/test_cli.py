"""The operator interface as an operator uses it: processes, files, signals."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pointswitch import config as config_mod
from pointswitch.codecs import crypto
from pointswitch.simulators.terminal import TerminalClient, TerminalError

PS = [sys.executable, "-m", "pointswitch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, env: dict[str, str] | None = None, check: bool = True,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pointswitch ARGS``; ``stdin`` is piped to it (how secrets reach admin commands)."""
    result = subprocess.run([*PS, *args], capture_output=True, text=True, timeout=120, input=stdin or "",
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


class Server:
    def __init__(self, tmp: Path, *, dsn: str | None, data_dir: Path | None = None, log_level: str = "info",
                 env: dict[str, str] | None = None, extra_config: str = "", extra_args: tuple[str, ...] = ()):
        self.cup, self.iso = _free_port(), _free_port()
        self.config = tmp / "pointswitch.toml"
        self.config.write_text(
            f'[[listener]]\nname = "cup"\nport = {self.cup}\nhost = "127.0.0.1"\ndialect = "cup"\n'
            f'framing = "binary2"\n\n'
            f'[[listener]]\nname = "iso87"\nport = {self.iso}\nhost = "127.0.0.1"\ndialect = "iso87"\n'
            f'framing = "ascii4"\n\n[limits]\nshutdown_grace_s = 10\n' + extra_config
            # The web layer on a free port: 8080 may be taken by another switch on this machine.
            + ("" if "[http]" in extra_config else "\n[http]\nport = 0\n")
        )
        self.stderr_path = tmp / f"serve-{self.cup}.log"
        args = [*PS, "serve", "--config", str(self.config), "--log-level", log_level, *extra_args]
        if dsn:
            args += ["--dsn", dsn]
        env = {**os.environ, **(env or {})}
        if data_dir:
            env["POINTSWITCH_DATA_DIR"] = str(data_dir)
        self.stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.stderr, env=env)
        self.events: list[dict] = []

    def wait_ready(self, timeout_s: float = 60, listeners: int = 2) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited: {self.stderr_path.read_text()}"
            ready = [e for e in self.read_events() if e.get("event") == "listener ready"]
            if len(ready) == listeners:
                return ready
            time.sleep(0.1)
        raise AssertionError("listeners not ready: " + self.stderr_path.read_text())

    def wait_for(self, event: str, count: int, timeout_s: float = 30) -> list[dict]:
        """The first ``count`` log events named ``event``, once there are that many."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [e for e in self.read_events() if e.get("event") == event]
            if len(found) >= count:
                return found[:count]
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} {event!r} events: " + self.stderr_path.read_text())

    def read_events(self) -> list[dict]:
        out = []
        for line in self.stderr_path.read_text().split("\n")[:-1]:  # whole lines only: serve may be writing
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.stderr.close()
        return code


async def test_serve_with_two_workers_shares_the_ports_and_stops_cleanly(switch, network, tmp_path):
    """Two worker processes on the same ports (SO_REUSEPORT): connections are spread
    over both, a terminal signed on through one is served by the other (the session
    cache is coherent across processes), every accrual posts once, SIGTERM stops all."""
    server = Server(tmp_path, dsn=switch.dsn, env={"POINTSWITCH_MASTER_KEY": switch.master_key_hex},
                    extra_args=("--workers", "2"))
    try:
        server.wait_ready(listeners=4)
        running = server.wait_for("switch running", 2)
        assert sorted(e["worker"] for e in running) == [0, 1] and len({e["pid"] for e in running}) == 2
        network.ports = {"cup": server.cup, "iso87": server.iso}
        terms = [network.terminal(0, sign_on=i == 0) for i in range(12)]
        for t in terms:
            await t.connect()
        for i, t in enumerate(terms[1:], 1):
            t.pik, t.mak, t.trace = terms[0].pik, terms[0].mak, 100 * i  # one terminal: traces of its own
        try:
            replies = [await t.accrue(network.cards[0], 1000) for t in terms]
        finally:
            for t in terms:
                await t.close()
        assert {r.rc for r in replies} == {"00"}
        assert await network.balance(network.cards[0]) == 120
        served = {e["worker"] for e in server.read_events() if e.get("event") == "transaction"}
        assert served == {0, 1}, "both workers served transactions"
    finally:
        assert server.stop() == 0


@pytest.fixture
def key_env(switch) -> dict[str, str]:
    """The operator's master key, as an operator of an external database supplies it."""
    return {"POINTSWITCH_MASTER_KEY": switch.master_key_hex}


def test_serve_logs_one_line_per_listener_and_admin_works_while_it_runs(switch, tmp_path, key_env):
    server = Server(tmp_path, dsn=switch.dsn, env=key_env)
    try:
        ready = server.wait_ready()
        expected = [("cup", server.cup), ("iso87", server.iso)]
        assert sorted((e["listener"], e["port"]) for e in ready) == sorted(expected)
        db = ["--dsn", switch.dsn]
        _cli("admin", "merchant", "add", "MCLI00000000001", "--name", "Tea House", "--earn-rate", "2", *db,
             env=key_env)
        added = json.loads(_cli("admin", "terminal", "add", "TCLI0001", "--merchant", "MCLI00000000001",
                                "--json", *db, env=key_env).stdout)
        _cli("admin", "card", "add", "6288881111222233334", "--name", "Li Lei", "--phone", "13800000000",
             "--pin", "-", *db, env=key_env, stdin="246810\n")
        sim = ["--port", str(server.cup), "--terminal", "TCLI0001", "--merchant", "MCLI00000000001", "--json"]
        env = {"XDG_STATE_HOME": str(tmp_path / "state"), **key_env}
        signed = json.loads(_cli("sim", "terminal", "sign-on", *sim, "--tmk", "-", env=env,
                                 stdin=added["tmk"] + "\n").stdout)
        earned = json.loads(_cli("sim", "terminal", "accrue", *sim, "--card", "6288881111222233334",
                                 "--amount", "12.50", env=env).stdout)
        reversed_ = json.loads(_cli("sim", "terminal", "reverse", *sim, "--trace", earned["trace"], env=env).stdout)
        card = json.loads(_cli("admin", "card", "show", "6288881111222233334", "--json", *db, env=env).stdout)
        merchants = json.loads(_cli("admin", "merchant", "list", "--json", *db, env=env).stdout)
        terminals = json.loads(_cli("admin", "terminal", "list", "--merchant", "MCLI00000000001", "--json",
                                    *db, env=env).stdout)
        blocked = json.loads(_cli("admin", "card", "block", "6288881111222233334", "--json", *db, env=env).stdout)
        declined = _cli("sim", "terminal", "accrue", *sim, "--card", "6288881111222233334", "--amount", "1",
                        env=env, check=False)
        settled = json.loads(_cli("sim", "terminal", "settle", *sim, env=env).stdout)
        uploaded = json.loads(_cli("sim", "terminal", "upload", *sim, env=env).stdout)
        next_batch = json.loads(_cli("sim", "terminal", "sign-on", *sim, env=env).stdout)
        check = _cli("admin", "check", "--json", *db, env=env)
    finally:
        code = server.stop()
    assert code == 0
    assert signed["rc"] == "00"
    assert (settled["mti"], settled["rc"], uploaded["mti"], uploaded["rc"]) == ("0510", "00", "0330", "00")
    assert next_batch["batch"] == "000002"
    assert (earned["rc"], earned["points_moved"], earned["points_balance"]) == ("00", 25, 25)
    assert (reversed_["rc"], reversed_["points_balance"]) == ("00", 0)
    assert card["points_balance"] == 0
    assert [p["points"] for p in card["postings"]] == [-25, 25]
    assert card["has_pin"] is True
    assert "246810" not in json.dumps(card) and "scrypt" not in json.dumps(card), "no PIN or PIN hash shown"
    assert any(m["merchant_id"] == "MCLI00000000001" and m["earn_rate_points_per_yuan"] == "2" for m in merchants)
    assert terminals[0]["terminal_id"] == "TCLI0001" and terminals[0]["signed_on_at"]
    assert blocked["status"] == "blocked"
    assert declined.returncode == 1 and json.loads(declined.stdout)["rc"] == "62"
    assert json.loads(check.stdout) == {"ok": True, "problems": []}
    logged = server.stderr_path.read_text()
    assert "6288881111222233334" not in logged, "card numbers must be masked in logs"
    assert "628888*********3334" in logged


def test_sigterm_finishes_requests_in_flight_and_exits_0(switch, tmp_path, key_env):
    server = Server(tmp_path, dsn=switch.dsn, env=key_env)
    server.wait_ready()
    db = ["--dsn", switch.dsn]
    _cli("admin", "merchant", "add", "MSIG00000000001", "--name", "Shop", "--earn-rate", "1", *db, env=key_env)
    added = json.loads(_cli("admin", "terminal", "add", "TSIG0001", "--merchant", "MSIG00000000001", "--json",
                            *db, env=key_env).stdout)
    _cli("admin", "card", "add", "6288882222333344445", "--name", "Han Meimei", *db, env=key_env)

    async def burst() -> list[str]:
        async with TerminalClient("127.0.0.1", server.cup, "TSIG0001", "MSIG00000000001",
                                  tmk=bytes.fromhex(added["tmk"]), sign_on_at_connect=True) as term:
            pending = [asyncio.ensure_future(term.accrue("6288882222333344445", 100)) for _ in range(30)]
            await asyncio.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            replies = await asyncio.gather(*pending, return_exceptions=True)
        return [r.rc if hasattr(r, "rc") else repr(r) for r in replies]

    codes = asyncio.run(burst())
    assert server.stop() == 0
    answered = [c for c in codes if c == "00"]
    assert answered == ["00"] * 30, f"requests sent before SIGTERM must be answered: {codes}"
    card = json.loads(_cli("admin", "card", "show", "6288882222333344445", "--json", *db, env=key_env).stdout)
    assert card["points_balance"] == len(answered), "every answered request posted, nothing else"
    events = [e["event"] for e in server.read_events()]
    assert "stopped" in events


def test_embedded_database_persists_across_restarts(tmp_path):
    data = tmp_path / "data"
    env = {"POINTSWITCH_DATA_DIR": str(data)}
    server = Server(tmp_path, dsn=None, data_dir=data)
    try:
        server.wait_ready()
        _cli("admin", "merchant", "add", "MPER00000000001", "--name", "Keep", "--earn-rate", "1", env=env)
    finally:
        assert server.stop() == 0
    again = Server(tmp_path, dsn=None, data_dir=data)
    try:
        again.wait_ready()
        listed = json.loads(_cli("admin", "merchant", "list", "--json", env=env).stdout)
    finally:
        assert again.stop() == 0
    assert [m["merchant_id"] for m in listed] == ["MPER00000000001"]


def test_demo_runs_the_scenario_and_the_invariants_hold(tmp_path):
    result = _cli("demo", "--data-dir", str(tmp_path / "demo"))
    assert "ledger invariants hold" in result.stdout
    assert "FAIL" not in result.stdout
    # The day ends: every terminal settled in agreement, and the clearing of the day
    # pays the bank what the bank host says it credited, and sums to zero.
    assert result.stdout.count("settles batch 1 with the totals of its own journal") == 3
    files = list((tmp_path / "demo" / "clearing").glob("clearing-*.csv"))
    assert len(files) == 1
    rows = {r["party"]: r for r in csv.DictReader(io.StringIO(files[0].read_text(encoding="utf-8")))}
    credited = re.search(r"bank host: credited ([0-9.]+) yuan net", result.stdout)
    assert credited and int(rows["bank"]["paid_out_fen"]) == round(float(credited.group(1)) * 100) == 100
    assert int(rows["insurer"]["paid_out_fen"]) == 50 and rows["TOTAL"]["net_fen"] == "0"
    assert "sums to zero" in result.stdout
    assert "6288880000000000017" not in result.stdout + result.stderr
    assert "6222020000000000018" not in result.stdout + result.stderr, "bank card numbers are masked too"
    assert "bank host: credited 1.00 yuan net (2 credits, 1 reversed)" in result.stdout
    # Prometheus sees what the terminals did: the demo scrapes its own /metrics.
    counted = re.search(r"requests counted by /metrics \(operation, code\): (.*)", result.stdout)
    assert counted and "accrue 00 x8" in counted.group(1) and "cash_out 00 x1" in counted.group(1)


def test_config_file_and_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[listener]]\nname = "a"\nport = 7000\ndialect = "iso87"\nframing = "ascii4"\n'
                    '[limits]\nmax_connections = 5\n[database]\ndsn = "postgresql://file/db"\n')
    cfg = config_mod.load(path, env={"POINTSWITCH_LIMITS_MAX_CONNECTIONS": "7",
                                     "POINTSWITCH_DSN": "postgresql://env/db"})
    assert [(lc.name, lc.port, lc.dialect) for lc in cfg.listeners] == [("a", 7000, "iso87")]
    assert cfg.limits.max_connections == 7
    assert cfg.database.dsn == "postgresql://env/db"
    defaults = config_mod.load(None, env={})
    assert [(lc.port, lc.dialect, lc.framing) for lc in defaults.listeners] == [
        (5000, "cup", "binary2"), (5001, "iso87", "ascii4")]
    day = config_mod.load(None, env={"POINTSWITCH_DAY_CUTOFF": "00:00", "POINTSWITCH_DAY_TIME_ZONE": "UTC"}).day
    assert (day.cutoff_time().hour, day.time_zone, defaults.day.cutoff, defaults.day.time_zone) == (
        0, "UTC", "23:00", "Asia/Shanghai")
    for bad in ('[limits]\nmax_conections = 5\n', '[[listener]]\nname = "x"\nport = 1\ndialect = "x25"\n',
                '[limits]\nmax_connections = "many"\n', '[day]\ncutoff = "25:00"\n',
                '[day]\ntime_zone = "Mars/Olympus"\n'):
        path.write_text(bad)
        with pytest.raises(config_mod.ConfigError):
            config_mod.load(path, env={})


def test_a_bad_config_file_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[limits]\nmax_conections = 5\n")
    result = _cli("serve", "--config", str(path), check=False)
    assert result.returncode != 0
    assert "max_conections" in result.stderr


def test_an_external_database_without_the_master_key_is_refused(switch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "POINTSWITCH_MASTER_KEY"}
    result = subprocess.run([*PS, "serve", "--dsn", switch.dsn], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0
    assert "POINTSWITCH_MASTER_KEY" in result.stderr, result.stderr
    migrate = subprocess.run([*PS, "migrate", "--dsn", switch.dsn], capture_output=True, text=True, timeout=60,
                             env=env)
    assert migrate.returncode != 0 and "POINTSWITCH_MASTER_KEY" in migrate.stderr, "migrating needs the vault"
    wrong = _cli("admin", "terminal", "list", "--dsn", switch.dsn, check=False,
                 env={"POINTSWITCH_MASTER_KEY": "11" * 32})
    assert wrong.returncode != 0
    assert "not the one this database's keys are sealed under" in wrong.stderr, wrong.stderr
    assert "11" * 32 not in wrong.stderr, "the key itself is never printed"
    assert "migrations up to date" in _cli("migrate", "--dsn", switch.dsn,
                                           env={"POINTSWITCH_MASTER_KEY": switch.master_key_hex}).stdout


def test_terminal_master_key_printed_once_imported_and_rekeyed(switch, tmp_path, key_env):
    db = ["--dsn", switch.dsn]
    _cli("admin", "merchant", "add", "MKEY00000000001", "--name", "Keys", "--earn-rate", "1", *db, env=key_env)
    shown = _cli("admin", "terminal", "add", "TKEY0001", "--merchant", "MKEY00000000001", *db, env=key_env).stdout
    tmk, kcv = shown.split("terminal master key ")[1].split()[0], shown.split("check value ")[1].split()[0]
    assert len(tmk) == 32 and kcv == crypto.check_value(bytes.fromhex(tmk)).hex().upper()[: len(kcv)]
    listed = _cli("admin", "terminal", "list", "--merchant", "MKEY00000000001", "--json", *db, env=key_env).stdout
    assert tmk not in listed, "the TMK is shown once, when created, never again"

    imported = "0123456789ABCDEFFEDCBA9876543210"
    added = json.loads(_cli("admin", "terminal", "add", "TKEY0002", "--merchant", "MKEY00000000001",
                            "--tmk", "-", "--json", *db, env=key_env, stdin=imported + "\n").stdout)
    assert added["tmk"] == imported
    rekeyed = json.loads(_cli("admin", "terminal", "rekey", "TKEY0001", "--json", *db, env=key_env).stdout)
    assert rekeyed["tmk"] != tmk

    port = switch.ports["cup"]

    async def sign_on(key: str) -> str:
        async with TerminalClient("127.0.0.1", port, "TKEY0001", "MKEY00000000001", tmk=bytes.fromhex(key)) as term:
            return (await term.sign_on()).rc

    assert asyncio.run(sign_on(rekeyed["tmk"])) == "00"
    with pytest.raises(TerminalError, match="check value"):
        asyncio.run(sign_on(tmk))  # working keys from the host do not open under the replaced master key


def test_bank_simulator_and_connector_state_from_the_command_line(switch, tmp_path, key_env):
    bank_port, ledger = _free_port(), tmp_path / "bank.jsonl"
    bank = subprocess.Popen([*PS, "sim", "bank", "--port", str(bank_port), "--ledger", str(ledger)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert bank.stdout is not None and "bank simulator on" in bank.stdout.readline()
    connector = (f'\n[[connector]]\nname = "bank"\nport = {bank_port}\nresponse_timeout_s = 2\n'
                 '\n[cash_out]\npoints_per_yuan = "1"\n')
    server = Server(tmp_path, dsn=switch.dsn, env=key_env, extra_config=connector)
    db = ["--dsn", switch.dsn]
    try:
        server.wait_ready()
        _cli("admin", "merchant", "add", "MBNK00000000001", "--name", "Bank Shop", "--earn-rate", "1", *db,
             env=key_env)
        added = json.loads(_cli("admin", "terminal", "add", "TBNK0001", "--merchant", "MBNK00000000001",
                                "--json", *db, env=key_env).stdout)
        _cli("admin", "card", "add", "6288883333444455556", "--name", "Wei", "--pin", "-", *db, env=key_env,
             stdin="135790\n")
        sim = ["--port", str(server.cup), "--terminal", "TBNK0001", "--merchant", "MBNK00000000001", "--json"]
        env = {"XDG_STATE_HOME": str(tmp_path / "state"), **key_env}
        _cli("sim", "terminal", "sign-on", *sim, "--tmk", added["tmk"], env=env)
        _cli("sim", "terminal", "accrue", *sim, "--card", "6288883333444455556", "--amount", "20", env=env)
        paid = json.loads(_cli("sim", "terminal", "cash-out", *sim, "--card", "6288883333444455556", "--amount",
                               "5", "--bank-card", "6222020000000000018", "--pin", "135790", env=env).stdout)
        time.sleep(2.5)  # the switch publishes connector state every 2 s
        state = json.loads(_cli("admin", "connectors", "--json", *db, env=key_env).stdout)
    finally:
        assert server.stop() == 0
        bank.send_signal(signal.SIGTERM)
        bank.wait(10)
    assert (paid["rc"], paid["points_balance"]) == ("00", 15)
    logged = [e["op"] for e in server.read_events() if e.get("event") == "transaction"]
    assert logged == ["sign_on", "accrue", "cash_out"], "the log line names the ledger's operation"
    bank_state = next(c["state"] for c in state if c["name"] == "bank")
    assert bank_state["links_up"] == 2 and bank_state["answered"] >= 1
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(e["what"], e["amount_fen"]) for e in lines] == [("credit", 500)]
    assert "6222020000000000018" not in ledger.read_text(), "the simulator's file masks the bank card"
