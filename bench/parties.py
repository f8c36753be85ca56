"""The parties of a benchmark run: the build under test, the embedded PostgreSQL server,
and the switch as a process (``bench/throughput.py``, ``bench/targets.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil
from measure import BenchError, cpu_seconds, free_port, port_accepts, run


# -- the build under test --------------------------------------------------------------
@dataclass
class Build:
    executable: Path
    python: str = ""
    python_version: str = ""
    package_dir: str = ""
    commit: str = ""
    security: bool = False  # sim load and admin seed know --tmk and --pin
    secrets_on_stdin: bool = False  # admin seed reads --pin - from standard input (and refuses a literal)

    @classmethod
    def inspect(cls, executable: Path, env: dict[str, str]) -> Build:
        """Which Python and which pointswitch package the executable runs, and what it can do."""
        if not executable.exists():
            raise BenchError(f"{executable} does not exist (--pointswitch)")
        build = cls(executable.absolute())
        first = executable.read_bytes()[:300].split(b"\n", 1)[0].decode(errors="replace")
        build.python = first[2:].strip() if first.startswith("#!") else sys.executable
        probe = "import sys, pointswitch; print(sys.version.split()[0]); print(pointswitch.__file__)"
        out = run([build.python, "-c", probe], env=env, timeout=60).splitlines()
        build.python_version, build.package_dir = out[0], str(Path(out[1]).parent)
        try:
            head = subprocess.run(["git", "-C", build.package_dir, "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, timeout=10)
            dirty = subprocess.run(["git", "-C", build.package_dir, "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True, timeout=10)
            if head.returncode == 0:
                build.commit = head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")
        except (OSError, subprocess.TimeoutExpired):
            pass
        sim_help = run([str(executable), "sim", "load", "--help"], env=env, timeout=60)
        seed_help = run([str(executable), "admin", "seed", "--help"], env=env, timeout=60)
        build.security = "--tmk" in sim_help and "--pin" in sim_help and "--tmk" in seed_help
        build.secrets_on_stdin = "standard input" in " ".join(seed_help.split())
        return build


# -- the database server ---------------------------------------------------------------
@dataclass
class Postgres:
    """One embedded PostgreSQL server for the whole run."""

    folder: Path
    dsn: str = ""
    host: str = ""
    port: str = "5432"
    bin_dir: Path = Path()
    version: str = ""
    _server: Any = None

    def start(self) -> None:
        from pointswitch.ledger.database import EmbeddedServer

        self._server = EmbeddedServer(self.folder)
        self.dsn = self._server.start()
        self.bin_dir = self._server.bin_dir
        parts = urlsplit(self.dsn)
        self.host = parse_qs(parts.query).get("host", [parts.hostname or str(self._server.socket_dir)])[0]
        self.port = str(parts.port or 5432)
        self.version = self.psql("postgres", "SHOW server_version").strip()

    def restart(self) -> None:
        """Stop and start the same server (settings that need a restart)."""
        from pointswitch.ledger.database import EmbeddedServer

        assert self._server is not None
        self._server.stop()
        self._server = EmbeddedServer(self.folder)
        self.dsn = self._server.start()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PGHOST=self.host, PGPORT=self.port, PGUSER="postgres")
        return env

    def psql(self, database: str, sql: str) -> str:
        return run([str(self.bin_dir / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql],
                   env=self.env(), timeout=120)

    def cpu_seconds(self) -> dict[int, float]:
        """CPU seconds so far of the postmaster and each of its processes (backends, workers), by pid."""
        try:
            pid = int((self.folder / "pg" / "postmaster.pid").read_text().split()[0])
            postmaster = psutil.Process(pid)
            processes = [postmaster, *postmaster.children(recursive=True)]
        except (OSError, ValueError, IndexError, psutil.Error):
            return {}
        seconds = {}
        for proc in processes:
            try:
                seconds[proc.pid] = cpu_seconds(proc)
            except psutil.Error:
                continue
        return seconds

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()


# -- the switch ------------------------------------------------------------------------
@dataclass
class Switch:
    build: Build
    dsn: str
    folder: Path
    env: dict[str, str]
    log_level: str
    workers: int = 1  # serve --workers
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = Path()

    def start(self, timeout_s: float = 60.0, extra_config: str = "") -> None:
        """``serve`` on one cup listener with binary2 framing; returns once the port accepts."""
        self.port = free_port()
        config = self.folder / "switch.toml"
        config.write_text(
            "[[listener]]\n"
            'name = "cup"\n'
            f"port = {self.port}\n"
            'host = "127.0.0.1"\n'
            'dialect = "cup"\n'
            'framing = "binary2"\n' + extra_config
        )
        self.log_path = self.folder / "switch.log"
        cmd = [str(self.build.executable), "serve", "--config", str(config), "--dsn", self.dsn,
               "--log-level", self.log_level, *(["--workers", str(self.workers)] if self.workers > 1 else [])]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not port_accepts(self.port):
            if self.proc.poll() is not None:
                raise BenchError(f"the switch exited {self.proc.returncode} before listening:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"the switch did not listen on port {self.port} within {timeout_s:.0f} s")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self, *args: str) -> list[str]:
        return [str(self.build.executable), *args]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 30.0) -> int:
        """SIGTERM, as an operator stops it; its exit code (killed after the grace time: -9)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_summary(self) -> dict[str, Any]:
        """Lines by level, and the warning and error events with their counts."""
        levels: Counter[str] = Counter()
        notable: Counter[str] = Counter()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return {}
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):  # the standard library's lines: "LEVEL logger message"
                level = line.split(" ", 1)[0].lower() if line[:1].isupper() else "other"
                levels[level] += 1
                if level in ("warning", "error", "critical") or "Traceback" in line:
                    notable[line.strip()[:120]] += 1
                continue
            level = str(event.get("level", "?"))
            levels[level] += 1
            if level in ("warning", "error", "critical"):
                notable[f"{level}: {event.get('event')}"] += 1
        return {"lines_by_level": dict(levels), "notable": dict(notable.most_common(20)), "bytes": len(text.encode())}
