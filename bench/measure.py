"""How the benchmarks measure: child processes and ports, CPU seconds of every party
(the switch and its workers, the load generator, PostgreSQL, the rest of the
machine), resident memory, and the machine itself. Used by ``throughput.py``
and ``close_day.py``."""

from __future__ import annotations

import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import psutil

SAMPLE_S = 0.2  # memory and CPU sampling period


class BenchError(RuntimeError):
    """A step failed: the run cannot go on."""


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class ServerProcesses(Protocol):
    """A database server whose processes' CPU seconds can be read (``throughput.Postgres``)."""

    def cpu_seconds(self) -> dict[int, float]: ...


# -- processes -------------------------------------------------------------------------
def clean_env(master_key: str) -> dict[str, str]:
    """The environment of the switch's commands: none of the caller's pointswitch settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTSWITCH_") and k != "PYTHONPATH"}
    env["POINTSWITCH_MASTER_KEY"] = master_key  # ignored by builds without terminal security
    env["POINTSWITCH_HTTP_PORT"] = "0"  # the web layer on a free port, so runs side by side never collide
    return env


def stop_process(proc: subprocess.Popen[Any] | None, *, grace_s: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 300.0,
        tick: Callable[[], None] | None = None, stdin: str | None = None) -> str:
    """Run a command to completion, calling ``tick`` every SAMPLE_S meanwhile; its stdout, or BenchError.
    ``stdin`` is written to its standard input (how admin commands take secrets)."""
    what = f"{Path(cmd[0]).name} {' '.join(cmd[1:3])}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    pending_input = stdin
    try:
        while True:
            try:
                out, err = proc.communicate(pending_input, timeout=SAMPLE_S if tick else timeout)
                break
            except subprocess.TimeoutExpired:
                pending_input = None  # written already
                if time.monotonic() > deadline:
                    raise BenchError(f"{what}: not done within {timeout:.0f} s") from None
                if tick:
                    tick()
    finally:
        stop_process(proc)
    if proc.returncode != 0:
        tail = "\n".join((err or out).strip().splitlines()[-15:])
        raise BenchError(f"{what} exited {proc.returncode}:\n{tail}")
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def tree(proc: psutil.Process) -> list[psutil.Process]:
    """A process and its descendants (``serve --workers``: the parent and its workers)."""
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def tree_cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in tree(proc):
        try:
            total += cpu_seconds(p)
        except psutil.Error:
            continue
    return total


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


# -- CPU accounting --------------------------------------------------------------------
# Kernel threads work for whoever is measured (block I/O for WAL flushes, network): not "other work".
KERNEL_THREAD = re.compile(r"^(kworker|ksoftirqd|kswapd|kcompactd|jbd2|kdamond|rcu_|migration|irq/)")


def machine_busy_seconds() -> float:
    """CPU seconds that processes have used on the whole machine, all cores: user, nice and system time
    (interrupts, which do the networking of whoever is measured, and time stolen by a hypervisor are left out)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system)


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process's name and CPU seconds so far."""
    out = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info.get("cpu_times")
        if times is not None:
            out[proc.pid] = (str(proc.info.get("name")), times.user + times.system)
    return out


class CpuMeter:
    """Who used the CPU during a measurement: the switch, our child commands (load generator or pgbench, by
    their rusage once reaped), PostgreSQL (every server process, sampled: backends come and go), and the rest
    of the machine. On a small machine they all share the same cores."""

    def __init__(self, pg: ServerProcesses, switch_pid: int | None = None) -> None:
        self.pg = pg
        self.switch = psutil.Process(switch_pid) if switch_pid else None
        self.started = time.monotonic()
        self.machine = machine_busy_seconds()
        self.children = self._children()
        self.processes = process_cpu()
        self.switch_start = tree_cpu_seconds(self.switch) if self.switch else 0.0
        self.pg_start = pg.cpu_seconds()
        self.pg_seen = dict(self.pg_start)
        self.switch_seen = self.switch_start

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def tick(self) -> None:
        self.pg_seen.update(self.pg.cpu_seconds())
        if self.switch:
            try:
                self.switch_seen = tree_cpu_seconds(self.switch)
            except psutil.Error:
                pass

    def finish(self, command_pid: int | None = None) -> dict[str, Any]:
        """Percent of one core for each party since the start (call after the child command was reaped)."""
        self.tick()
        wall = max(time.monotonic() - self.started, 1e-9)
        switch = self.switch_seen - self.switch_start
        command = self._children() - self.children
        pg = sum(seconds - self.pg_start.get(pid, 0.0) for pid, seconds in self.pg_seen.items())
        ours = {os.getpid(), *self.pg_seen}
        ours.update(p for p in (command_pid, self.switch.pid if self.switch else None) if p)
        by_name: dict[str, float] = {}
        kernel = 0.0
        for pid, (name, seconds) in process_cpu().items():
            used = seconds - self.processes.get(pid, (name, 0.0))[1]
            if KERNEL_THREAD.match(name):
                kernel += used
            elif pid not in ours:
                by_name[name] = by_name.get(name, 0.0) + used
        busiest = sorted(by_name.items(), key=lambda item: -item[1])[:4]
        # The machine's total, less what is accounted for: also catches processes that came and went meanwhile.
        other = max(0.0, machine_busy_seconds() - self.machine - switch - command - pg - kernel)

        def pct(seconds: float) -> float:
            return round(100 * seconds / wall, 1)

        return {"switch": pct(switch), "command": pct(command), "postgres": pct(pg), "other": pct(other),
                "other_processes": {n: pct(s) for n, s in busiest if s / wall >= 0.02},
                "machine_percent": round(100 * (machine_busy_seconds() - self.machine) / wall
                                         / (os.cpu_count() or 1), 1)}


# -- the machine -----------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
            "os": platform.platform(), "python": platform.python_version()}


