"""Upstream host simulators: a bank that credits cards, an insurer that collects premiums.

Both speak iso87 over TCP, like the hosts pointswitch connects to. Rules decide
what happens to each 0200: approve (the default), decline with a code, delay,
or drop (never answer). Reversals (0400 / 0420) are acknowledged (0410 / 0430)
and undo the credit they name by retrieval reference (37), exactly once; a
reversal for a request never seen is remembered, so that a late original with
that reference is declined. Echo (0800, 70 = 301) is answered.

The simulator keeps a ledger of what it credited or collected; tests read it
(``net_fen``, ``entries``) and operators can have it appended to a JSON-lines
file (``ledger_file``), so anyone can prove each cash-out was paid exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from ..codecs import DecodeFailure, Fields, FrameDecoder, FramingError, dialect, framing
from ..logs import mask_pan

log = structlog.get_logger("pointswitch.sim.host")


_ECHOED = ("2", "3", "4", "7", "11", "32", "37", "41", "42", "48", "49")


@dataclass
class Rule:
    """When a request matches every condition given, do ``action``.

    action: "approve", "decline" (with ``rc``), "drop" (no answer). ``delay_s``
    delays the answer: the host decides (and credits) at once and answers late.
    ``times``: apply only to that many requests."""

    action: str = "approve"
    rc: str = "05"
    delay_s: float = 0.0
    card: str | None = None  # field 2
    policy: str | None = None  # field 48
    amount_over: int | None = None  # field 4, fen
    times: int | None = None

    def matches(self, fields: Fields) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.card is not None and fields.get("2") != self.card:
            return False
        if self.policy is not None and fields.get("48", "").strip() != self.policy:
            return False
        return not (self.amount_over is not None and int(fields.get("4", "0")) <= self.amount_over)


def load_rules(path: str | Path) -> list[Rule]:
    """A rules file: ``[[rule]]`` tables with the fields of :class:`Rule`."""
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    return [Rule(**item) for item in raw.get("rule", [])]


@dataclass
class Entry:
    kind: str  # "credit" (bank) or "premium" (insurer)
    rrn: str
    trace: str
    amount_fen: int
    account: str  # bank card or policy number
    at: str
    reversed: bool = False


@dataclass
class HostSimulator:
    kind: str = "bank"  # or "insurer"
    host: str = "127.0.0.1"
    port: int = 0
    framing_name: str = "ascii4"
    rules: list[Rule] = field(default_factory=list)
    ledger_file: Path | None = None
    answer_reversals: bool = True  # False: reversals are received but never acknowledged
    drop_every: int = 0  # never answer every Nth financial request (0: none)
    answer_echo: bool = True  # False: echo requests go unanswered (a hung host)
    connections_seen: list[str] = field(default_factory=list)  # peer of every connection accepted
    entries: dict[str, Entry] = field(default_factory=dict)  # by retrieval reference
    received: list[Fields] = field(default_factory=list)  # every request, in arrival order
    _reversed_unseen: set[str] = field(default_factory=set)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _auth: Any = field(default_factory=lambda: itertools.count(1))

    # -- life cycle ------------------------------------------------------------
    async def start(self) -> HostSimulator:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("host simulator listening", kind=self.kind, port=self.port)
        return self

    async def stop(self) -> None:
        """Stop listening and drop every connection (a host going down)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HostSimulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what it holds -----------------------------------------------------------
    def net_fen(self) -> int:
        """Money credited (or premiums collected) and not reversed."""
        return sum(e.amount_fen for e in self.entries.values() if not e.reversed)

    def requests(self, mti: str) -> list[Fields]:
        return [f for f in self.received if f.get("t") == mti]

    # -- serving -------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections_seen.append(str(writer.get_extra_info("peername")))
        spec = framing(self.framing_name)
        decoder = FrameDecoder(spec, 8192)
        codec = dialect("iso87")
        tasks: set[asyncio.Task[None]] = set()
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    try:
                        fields = codec.decode(frame).fields
                    except DecodeFailure as exc:
                        log.warning("host simulator: undecodable frame", reason=str(exc))
                        continue
                    task = asyncio.create_task(self._answer(fields, writer, spec))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except (OSError, FramingError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, fields: Fields, writer: asyncio.StreamWriter, spec: Any) -> None:
        self.received.append(fields)
        mti = fields.get("t", "")
        reply: Fields | None
        if mti == "0200":
            reply = await self._financial(fields)
        elif mti in ("0400", "0420"):
            if not self.answer_reversals:
                return
            reply = self._reversal(fields)
        elif mti == "0800":
            if not self.answer_echo:
                return
            reply = {**{k: fields[k] for k in ("7", "11", "70") if k in fields}, "t": "0810", "39": "00"}
        else:
            return
        if reply is None or writer.is_closing():
            return
        try:
            writer.write(spec.frame(dialect("iso87").encode(reply)))
            await writer.drain()
        except OSError:
            pass

    async def _financial(self, fields: Fields) -> Fields | None:
        rule = next((r for r in self.rules if r.matches(fields)), None)
        if rule is not None and rule.times is not None:
            rule.times -= 1
        reply = self._decide(fields, rule)
        if rule is not None and rule.delay_s:  # decided (and credited) at once, answered late
            await asyncio.sleep(rule.delay_s)
        return reply

    def _decide(self, fields: Fields, rule: Rule | None) -> Fields | None:
        dropped = self.drop_every > 0 and len(self.requests("0200")) % self.drop_every == 0
        if dropped or (rule is not None and rule.action == "drop"):
            log.info("host simulator: dropping a request", kind=self.kind, trace=fields.get("11"))
            return None
        reply: Fields = {k: fields[k] for k in _ECHOED if k in fields}
        reply["t"] = "0210"
        rrn = fields.get("37", "")
        if rule is not None and rule.action == "decline":
            reply["39"] = rule.rc
            return reply
        if rrn in self._reversed_unseen:
            reply["39"] = "05"  # reversed before it arrived: never credited
            return reply
        entry = self.entries.get(rrn)
        if entry is None:  # a retransmission of the same reference is credited once
            account = fields.get("48", "").strip() if self.kind == "insurer" else fields.get("2", "")
            entry = Entry("premium" if self.kind == "insurer" else "credit", rrn, fields.get("11", ""),
                          int(fields.get("4", "0")), account, datetime.now(UTC).isoformat(timespec="seconds"))
            self.entries[rrn] = entry
            self._append(entry, "credit")
        reply["39"] = "00"
        reply["38"] = f"{next(self._auth) % 1_000_000:06d}"
        if self.kind == "insurer":
            reply["63"] = f"INS{rrn}"
        return reply

    def _reversal(self, fields: Fields) -> Fields:
        rrn = fields.get("37", "")
        entry = self.entries.get(rrn)
        if entry is None:
            self._reversed_unseen.add(rrn)
        elif not entry.reversed:
            entry.reversed = True
            self._append(entry, "reversal")
        reply: Fields = {k: fields[k] for k in _ECHOED if k in fields and k != "48"}
        reply.update({"t": "0410" if fields["t"] == "0400" else "0430", "39": "00"})
        return reply

    def _append(self, entry: Entry, what: str) -> None:
        log.info("host simulator ledger", kind=self.kind, what=what, rrn=entry.rrn, amount_fen=entry.amount_fen,
                 account=mask_pan(entry.account) if self.kind == "bank" else entry.account)
        if self.ledger_file is not None:
            with open(self.ledger_file, "a", encoding="utf-8") as f:
                account = mask_pan(entry.account) if self.kind == "bank" else entry.account
                f.write(json.dumps({"what": what, **entry.__dict__, "account": account}) + "\n")
