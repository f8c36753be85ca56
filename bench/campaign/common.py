"""What every part of the campaign shares: its log, free ports, the clock."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import TextIO


class CampaignError(RuntimeError):
    """A step of the campaign itself failed (not a finding about the switch)."""


class Log:
    """Timestamped lines on stderr and in the campaign folder (``campaign.log``)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.file: TextIO | None = None
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.quiet = False

    def open(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __call__(self, message: str, *, echo: bool = True) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        line = f"[faults {stamp} +{time.monotonic() - self.started:7.2f}s] {message}"
        with self._lock:
            if echo and not self.quiet:
                print(line, file=self.stream, flush=True)
            if self.file is not None:
                self.file.write(line + "\n")
                self.file.flush()


say = Log()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_accepts(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
