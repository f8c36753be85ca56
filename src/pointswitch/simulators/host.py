"""Upstream host simulators: a bank that credits cards, an insurer that collects premiums.

Both speak iso87 over TCP (or TLS, with ``tls_cert`` and ``tls_key``), like the
hosts pointswitch connects to. Rules decide what happens to each 0200: approve
(the default), decline with a code, delay, or drop (never answer). Reversals
(0400 / 0420) are approved (0410 / 0430, 39 = 00) and undo the credit they name
by retrieval reference (37), exactly once; a reversal for a request never
credited is answered 25 and remembered, so that a late original with that
reference is declined. With ``reversal_rc`` set to another code, reversals are
refused with it and undo nothing. Echo (0800, 70 = 301) is answered.

With ``mac_key`` requests (0200 / 0400 / 0420) must carry a valid X9.19 MAC
(else they are answered A0 and change nothing) and answers are signed.
``corrupt_field`` makes every answer to them differ from its request in that
field (2, 4, 11, 37, 41; 64: a wrong MAC), and ``reading = False`` makes a host
that accepts connections and never reads from them.

The simulator keeps a ledger of what it credited or collected; tests read it
(``net_fen``, ``entries``) and operators can have it appended to a JSON-lines
file (``ledger_file``), so anyone can prove each cash-out was paid exactly once.
A host started again on the same file reads it back first: what it credited,
reversed, or was asked to reverse before it saw it survives a crash or restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import ssl
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from ..codecs import DecodeFailure, Fields, FrameDecoder, FramingError, Message, dialect, framing
from ..logs import mask_pan
from ..switch.upstream_wire import SIGNED_REQUESTS, Signer

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
    reversal_rc: str = "00"  # another code: reversals are refused with it and undo nothing
    corrupt_field: str | None = None  # answers to 0200/0400/0420 differ from the request here ("64": bad MAC)
    reading: bool = True  # False (set before start): connections are accepted and never read
    mac_key: bytes | None = field(default=None, repr=False)  # X9.19: requests checked, answers signed
    tls_cert: str | None = None  # PEM files: serve TLS with this certificate and key ...
    tls_key: str | None = None
    tls_client_ca: str | None = None  # ... and require a client certificate signed by this CA
    mac_failures: int = 0  # requests whose MAC was missing or wrong
    connections_seen: list[str] = field(default_factory=list)  # peer of every connection accepted
    entries: dict[str, Entry] = field(default_factory=dict)  # by retrieval reference
    received: list[Fields] = field(default_factory=list)  # every request, in arrival order
    _reversed_unseen: set[str] = field(default_factory=set)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _auth: Any = field(default_factory=lambda: itertools.count(1))

    # -- life cycle ------------------------------------------------------------
    async def start(self) -> HostSimulator:
        self._read_ledger()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not self.reading:  # a small window: a client's writes stall after a few kilobytes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.bind((self.host, self.port))
        self._server = await asyncio.start_server(self._serve, sock=sock, ssl=self._tls())
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

    def _tls(self) -> ssl.SSLContext | None:
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.tls_client_ca)
        return context

    def _read_ledger(self) -> None:
        """Take back what an earlier run on the same ledger file credited and reversed, so
        that a restarted host neither credits a reference twice nor answers 25 to the
        reversal of a credit it made before it stopped."""
        if self.ledger_file is None or not self.ledger_file.exists():
            return
        text = self.ledger_file.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a line cut short by a crash: end it before appending
            with open(self.ledger_file, "a", encoding="utf-8") as f:
                f.write("\n")
        for line in text.splitlines():
            try:
                item = json.loads(line)
                what, rrn = item["what"], str(item["rrn"])
                if what == "credit":
                    self.entries[rrn] = Entry(item["kind"], rrn, str(item["trace"]), int(item["amount_fen"]),
                                              str(item["account"]), str(item["at"]))
                elif what == "reversal" and rrn in self.entries:
                    self.entries[rrn].reversed = True
                elif what == "reversal_unseen":
                    self._reversed_unseen.add(rrn)
            except (ValueError, KeyError, TypeError):
                continue  # the cut line

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
        if not self.reading and isinstance(writer.transport, asyncio.ReadTransport):
            writer.transport.pause_reading()  # nothing read: not even into the stream's own buffer
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    try:
                        message = codec.decode(frame)
                    except DecodeFailure as exc:
                        log.warning("host simulator: undecodable frame", reason=str(exc))
                        continue
                    task = asyncio.create_task(self._answer(message, frame, writer, spec))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except (OSError, FramingError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, message: Message, frame: bytes, writer: asyncio.StreamWriter, spec: Any) -> None:
        fields = message.fields
        self.received.append(fields)
        mti = fields.get("t", "")
        signer = Signer(self.mac_key, dialect("iso87")) if self.mac_key else None
        reply: Fields | None
        if mti in SIGNED_REQUESTS and signer is not None and not signer.verify(message, frame):
            self.mac_failures += 1
            log.warning("host simulator: MAC missing or wrong", kind=self.kind, mti=mti, trace=fields.get("11"))
            reply = {**{k: fields[k] for k in _ECHOED if k in fields and k != "48"},
                     "t": "0410" if mti == "0400" else "0430" if mti == "0420" else "0210", "39": "A0"}
        elif mti == "0200":
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
            writer.write(spec.frame(self._encode(reply, signer)))
            await writer.drain()
        except OSError:
            pass

    def _encode(self, reply: Fields, signer: Signer | None) -> bytes:
        answers_request = reply["t"] in ("0210", "0410", "0430")
        corrupt = self.corrupt_field if answers_request else None
        if corrupt and corrupt in reply:
            reply = {**reply, corrupt: _other(reply[corrupt])}
        if signer is None or not answers_request:
            return dialect("iso87").encode(reply)
        encoded = signer.encode(reply)
        if corrupt == "64":  # flip the last hex digit of the MAC
            encoded = encoded[:-1] + (b"0" if encoded[-1:] != b"0" else b"1")
        return encoded

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
        rc = self.reversal_rc
        if rc != "00":
            log.info("host simulator: reversal refused", kind=self.kind, rrn=rrn, rc=rc)
        elif entry is None:
            if rrn not in self._reversed_unseen:
                self._reversed_unseen.add(rrn)
                self._append_unseen(fields)
            rc = "25"  # original not found: nothing to undo (and a late original will be declined)
        elif not entry.reversed:
            entry.reversed = True
            self._append(entry, "reversal")
        reply: Fields = {k: fields[k] for k in _ECHOED if k in fields and k != "48"}
        reply.update({"t": "0410" if fields["t"] == "0400" else "0430", "39": rc})
        return reply

    def _append(self, entry: Entry, what: str) -> None:
        log.info("host simulator ledger", kind=self.kind, what=what, rrn=entry.rrn, amount_fen=entry.amount_fen,
                 account=mask_pan(entry.account) if self.kind == "bank" else entry.account)
        if self.ledger_file is not None:
            with open(self.ledger_file, "a", encoding="utf-8") as f:
                account = mask_pan(entry.account) if self.kind == "bank" else entry.account
                f.write(json.dumps({"what": what, **entry.__dict__, "account": account}) + "\n")


    def _append_unseen(self, fields: Fields) -> None:
        """A reversal for a reference never credited: remembered in the ledger file too, so that a
        late original is declined also after a restart."""
        if self.ledger_file is not None:
            with open(self.ledger_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"what": "reversal_unseen", "kind": self.kind, "rrn": fields.get("37", ""),
                                    "trace": fields.get("11", ""), "amount_fen": int(fields.get("4", "0") or 0),
                                    "at": datetime.now(UTC).isoformat(timespec="seconds")}) + "\n")


def _other(value: str) -> str:
    """``value`` with its last character changed (a digit stays a digit)."""
    last = value[-1:] or "0"
    changed = str((int(last) + 1) % 10) if last.isdigit() else ("A" if last != "A" else "B")
    return value[:-1] + changed
