"""Several ``sim load`` processes as one load generator (``throughput.py --load-processes N``),
so that the load generator is never the limit: each drives terminals of its own
(``--first-terminal``), and their reports merge exactly (``--latencies``)."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from measure import SAMPLE_S, BenchError, stop_process


def split(connections: int, processes: int) -> list[tuple[int, int]]:
    """(first terminal, connections) of each process: the terminals 1..connections, shared out."""
    share, extra = divmod(connections, processes)
    out, first = [], 1
    for i in range(processes):
        n = share + (1 if i < extra else 0)
        if n:
            out.append((first, n))
        first += n
    return out


def run_many(cmds: list[list[str]], *, env: dict[str, str], timeout: float, tick: Callable[[], None]) -> list[str]:
    """Run the commands side by side, calling ``tick`` meanwhile; their standard outputs. Each writes to a
    file of its own: a pipe nobody reads yet would fill while another process is waited for."""
    with contextlib.ExitStack() as files:
        outs = [files.enter_context(tempfile.TemporaryFile("w+")) for _ in cmds]
        errs = [files.enter_context(tempfile.TemporaryFile("w+")) for _ in cmds]
        procs = [subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, stdin=subprocess.DEVNULL,
                                  start_new_session=True) for cmd, out, err in zip(cmds, outs, errs, strict=True)]
        deadline = time.monotonic() + timeout
        try:
            while any(proc.poll() is None for proc in procs):
                if time.monotonic() > deadline:
                    raise BenchError(f"sim load: not done within {timeout:.0f} s")
                tick()
                time.sleep(SAMPLE_S)
        finally:
            for proc in procs:
                stop_process(proc)
        texts = []
        for proc, out, err in zip(procs, outs, errs, strict=True):
            out.seek(0)
            err.seek(0)
            if proc.returncode != 0:
                raise BenchError(f"sim load exited {proc.returncode}:\n{err.read()[-1500:]}")
            texts.append(out.read())
        return texts


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several: counts summed, the rate over the longest run, percentiles over every answer."""
    latencies = sorted(x for r in reports for x in r.pop("latencies_ms", []))
    elapsed = max(float(r["elapsed_s"]) for r in reports)

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else 0.0

    def summed(key: str) -> dict[str, int]:
        total: Counter[str] = Counter()
        for r in reports:
            total.update(r.get(key) or {})
        return dict(sorted(total.items()))

    terminals: dict[str, Any] = {}
    for r in reports:
        terminals.update(r.get("terminals") or {})
    return {
        "requests": sum(int(r["requests"]) for r in reports), "answered": len(latencies),
        "elapsed_s": round(elapsed, 3), "throughput_tps": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "latency_ms_p50": pct(0.50), "latency_ms_p95": pct(0.95), "latency_ms_p99": pct(0.99),
        "latency_ms_max": round(latencies[-1], 2) if latencies else 0.0,
        "latency_ms_mean": round(statistics.fmean(latencies), 2) if latencies else 0.0,
        "response_codes": summed("response_codes"), "operations": summed("operations"), "errors": summed("errors"),
        "outcomes": summed("outcomes"), "terminals": terminals, "load_processes": len(reports),
    }


def parse(outs: list[str]) -> list[dict[str, Any]]:
    try:
        return [json.loads(out) for out in outs]
    except ValueError as exc:
        raise BenchError(f"sim load printed no JSON report ({exc})") from None
