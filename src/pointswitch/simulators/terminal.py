"""A UnionPay-style POS terminal that speaks the wire (codecs only).

Several requests may be outstanding on one connection; responses are matched
to requests by MTI and trace number (field 11).

Terminal practice, with ``reversal_on_timeout``: a financial request (0200 /
0220, not an inquiry) left unanswered within ``timeout_s`` (or whose connection
closed first) is reversed: a 0400 copy of it with 39 = 98, without its PIN
block, MAC'd again, sent up to ``reversal_attempts`` times, ``reversal_delay_s``
apart, until the switch answers it (redialling when the connection is gone).
The request then raises :class:`NoAnswer`, which carries the reversal's answer.
With a ``journal`` every request is written there once its outcome is final.

Batch settlement, as a terminal does it: the terminal keeps the answered
financial requests of its open batch in memory (with clear card numbers, as a
terminal's batch store does; the file journal keeps them masked), adds them up
by the settlement rule (approved accruals, redemptions, cash-outs and premiums
are debits; approved voids and refunds credits; a transaction it reversed is
left out), sends the 0500 and then uploads the batch's records, 8 a message.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..codecs import DecodeFailure, FrameDecoder, FramingError, crypto, dialect, framing
from ..codecs.cup import Envelope
from ..codecs.subfields import Field60, UploadRecord, parse_62
from .journal import TerminalJournal
from .reply import FINANCIAL_MTIS, OPS, PIN_OPS, NoAnswer, Reply, TerminalError, describe, reversal_of, reversible
from .settlement import BatchSettlement

__all__ = ["OPS", "NoAnswer", "Reply", "TerminalClient", "TerminalError", "describe"]


@dataclass
class TerminalClient(BatchSettlement):
    host: str
    port: int
    terminal_id: str
    merchant_id: str
    dialect_name: str = "cup"
    framing_name: str = "binary2"
    batch: int = 1
    trace: int = 0
    timeout_s: float = 10.0
    max_frame_bytes: int = 8192
    tmk: bytes | None = field(default=None, repr=False)  # terminal master key, loaded at installation
    default_pin: str | None = field(default=None, repr=False)  # the PIN "typed" when none is given
    # The MAK fills the 16-byte slot of field 62 (3DES MAC); the iso87 (X9.19) default.
    double_mak: bool | None = None
    local_host: str | None = None  # the source address to connect from (tests: 127.0.0.x)
    pik: bytes | None = field(default=None, repr=False)
    mak: bytes | None = field(default=None, repr=False)
    tdk: bytes | None = field(default=None, repr=False)
    sign_on_at_connect: bool = False
    # Terminal practice (see the module's docstring); off here, on in `sim terminal` and `sim load`.
    reversal_on_timeout: bool = False
    reversal_attempts: int = 3
    reversal_delay_s: float = 1.0
    journal: TerminalJournal | None = None  # every request and its outcome, as this terminal saw it
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _pending: dict[tuple[str, str], asyncio.Future[Reply]] = field(default_factory=dict)
    _unmatched: asyncio.Queue[dict[str, str]] = field(default_factory=asyncio.Queue)
    _reader_task: asyncio.Task[None] | None = None
    # The answered financial requests of the open batch (clear card numbers: the terminal's batch store).
    batch_store: list[Reply] = field(default_factory=list, repr=False)
    # After a settlement: its batch, whether it balanced, and the records to upload.
    settled: tuple[int, bool, list[UploadRecord]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.dialect = dialect(self.dialect_name)
        self.framing = framing(self.framing_name)
        self._sent: dict[tuple[str, str], tuple[dict[str, str], float]] = {}
        self._redial = asyncio.Lock()

    # -- connection -------------------------------------------------------------
    async def connect(self) -> TerminalClient:
        await self._open()
        if self.sign_on_at_connect:
            await self.sign_on()
        return self

    async def _open(self) -> None:
        local = (self.local_host, 0) if self.local_host else None
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, local_addr=local), self.timeout_s
        )
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def reconnect(self) -> None:
        """Dial again when the connection is gone, keeping the working keys (they belong
        to the terminal, not to a connection): no sign-on."""
        async with self._redial:
            if self._writer is not None and not self.closed_by_peer and not self._writer.is_closing():
                return
            await self.close()
            await self._open()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass

    async def __aenter__(self) -> TerminalClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed_by_peer(self) -> bool:
        return self._reader_task is not None and self._reader_task.done()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        decoder = FrameDecoder(self.framing, self.max_frame_bytes)
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for frame in decoder.feed(data):
                    try:
                        message = self.dialect.decode(frame)
                    except DecodeFailure:
                        continue
                    key = (message.fields["t"], message.fields.get("11", ""))
                    future = self._pending.pop(key, None)
                    if future is not None and not future.done():
                        request, sent_at = self._sent.pop(key)
                        latency_ms = (time.perf_counter() - sent_at) * 1000
                        mac_ok = None
                        mac_fn = self._mac_fn()
                        if "64" in message.fields and mac_fn is not None and message.mac_data is not None:
                            mac_ok = mac_fn(message.mac_data) == bytes.fromhex(message.fields["64"])
                        future.set_result(Reply(request, message.fields, latency_ms, message.envelope, mac_ok))
                    else:
                        self._unmatched.put_nowait(message.fields)
        except (ConnectionError, FramingError, OSError):
            pass
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(TerminalError("connection closed by the switch"))
            self._pending.clear()

    # -- sending --------------------------------------------------------------
    def next_trace(self) -> int:
        self.trace = self.trace % 999999 + 1
        return self.trace

    def base_fields(self, mti: str, proc: str, txn_type: str, *, trace: int | None = None,
                    network_code: str = "") -> dict[str, str]:
        trace = self.next_trace() if trace is None else trace
        return {
            "t": mti,
            "3": proc,
            "11": f"{trace:06d}",
            "25": "00",
            "41": self.terminal_id.ljust(8)[:8],
            "42": self.merchant_id.ljust(15)[:15],
            "60": Field60(txn_type, f"{self.batch:06d}", network_code).render(),
        }

    async def send_raw(self, payload: bytes) -> None:
        """Write bytes as they are (already framed or not): for malformed-input tests."""
        assert self._writer is not None
        self._writer.write(payload)
        await self._writer.drain()

    @property
    def mak_is_double(self) -> bool:
        return self.double_mak if self.double_mak is not None else self.dialect_name == "iso87"

    def _mac_fn(self) -> Any:
        """UnionPay "ECB" on cup, X9.19 on iso87, under the MAK of the last sign-on."""
        mak = self.mak
        if mak is None:
            return None
        if self.dialect_name == "iso87":
            return lambda data: crypto.mac_x919(mak, data)
        return lambda data: crypto.mac_cup_ecb(mak, data)

    async def send(self, fields: dict[str, str], envelope: Envelope | None = None, *,
                   tamper: bool = False, mac: bool | None = None) -> Reply:
        """Send one request and wait for the response with the same trace number.

        Financial requests carry a MAC when the terminal has a MAC key; with
        ``tamper`` one digit of the amount is changed after the MAC was computed.
        Unanswered: :class:`NoAnswer`, after the reversal when the terminal reverses."""
        try:
            reply = await self._exchange(fields, envelope, tamper=tamper, mac=mac)
        except NoAnswer as unanswered:
            if self.reversal_on_timeout and reversible(fields):
                unanswered.reversal, unanswered.reversal_attempts = await self._reverse_until_answered(fields)
            if self.journal is not None:
                self.journal.record(self.terminal_id, self.merchant_id, fields, None,
                                    reversal=unanswered.reversal, reversal_attempts=unanswered.reversal_attempts)
            raise
        if self.journal is not None:
            self.journal.record(self.terminal_id, self.merchant_id, fields, reply)
        if fields["t"] in FINANCIAL_MTIS and fields.get("60", "")[2:8] == f"{self.batch:06d}":
            self.batch_store.append(reply)
        return reply

    async def _reverse_until_answered(self, original: dict[str, str]) -> tuple[Reply | None, int]:
        """Send the reversal of ``original`` until it is answered, ``reversal_attempts``
        times at most: its answer (None if never answered) and the attempts made."""
        reversal = reversal_of(original, "98")
        for attempt in range(1, self.reversal_attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.reversal_delay_s)
            try:
                await self.reconnect()
                return await self._exchange(reversal, None), attempt
            except (TerminalError, OSError, TimeoutError):
                continue
        return None, self.reversal_attempts

    async def _exchange(self, fields: dict[str, str], envelope: Envelope | None = None, *,
                        tamper: bool = False, mac: bool | None = None) -> Reply:
        assert self._writer is not None, "connect first"
        if self.closed_by_peer:
            raise TerminalError("connection closed by the switch")
        response_mti = fields["t"][:2] + str(int(fields["t"][2]) + 1) + fields["t"][3]
        key = (response_mti, fields.get("11", ""))
        if key in self._pending:
            raise TerminalError(f"trace {key[1]} already outstanding on this connection")
        if mac is None:
            mac = fields["t"] in FINANCIAL_MTIS
        mac_fn = self._mac_fn() if mac else None
        payload = self.dialect.encode(fields, envelope, sign=mac_fn)
        if tamper:
            payload = self._tampered(payload, fields)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending[key] = future
        self._sent[key] = (dict(fields), time.perf_counter())  # uvloop's loop.time() is in whole ms
        self._writer.write(self.framing.frame(payload))
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise NoAnswer(fields, f"no response to trace {key[1]} within {self.timeout_s}s") from None
        except TerminalError as exc:  # the connection closed with the request outstanding
            raise NoAnswer(fields, f"no response to trace {key[1]}: {exc}") from None
        finally:
            if self._pending.get(key) is future:
                del self._pending[key]
            self._sent.pop(key, None)

    def _tampered(self, payload: bytes, fields: dict[str, str]) -> bytes:
        """Change the last digit of the amount (field 4), keeping the format valid."""
        amount = fields.get("4", "")
        raw = bytes.fromhex(amount) if self.dialect_name == "cup" else amount.encode()
        at = payload.find(raw) if amount else -1
        if at < 0:
            raise TerminalError("tamper needs an amount (field 4) to change")
        out = bytearray(payload)
        last = at + len(raw) - 1
        if self.dialect_name == "cup":
            out[last] = (out[last] & 0xF0) | (((out[last] & 0x0F) + 1) % 10)
        else:
            out[last] = ord(str((out[last] - 48 + 1) % 10))
        return bytes(out)

    async def next_unmatched(self, timeout_s: float = 2.0) -> dict[str, str]:
        return await asyncio.wait_for(self._unmatched.get(), timeout_s)

    # -- operations -----------------------------------------------------------
    async def sign_on(self, network_code: str = "003") -> Reply:
        """Sign on: take the host's batch number and the working keys of field 62,
        decrypted under the terminal master key and checked against their check values."""
        fields = self.base_fields("0800", "", "00", network_code=network_code)
        del fields["3"], fields["25"]
        reply = await self.send(fields)
        if reply.approved and "60" in reply.fields:
            batch = int(reply.fields["60"][2:8])
            if batch != self.batch:  # the host opened another batch: a new batch store
                self.batch, self.batch_store = batch, []
        if reply.approved and "62" in reply.fields and self.tmk is not None:
            pik, mak, tdk = parse_62(network_code, bytes.fromhex(reply.fields["62"]),
                                     double_mak=self.mak_is_double and network_code != "001")
            keys = {}
            for name, block in (("PIK", pik), ("MAK", mak), ("TDK", tdk)):
                if block is None:
                    continue
                clear = crypto.decrypt(self.tmk, block.under_tmk)
                if crypto.check_value(clear) != block.check_value:
                    raise TerminalError(f"{name} check value does not match: wrong terminal master key?")
                keys[name] = clear
            self.pik, self.mak, self.tdk = keys["PIK"], keys["MAK"], keys.get("TDK")
        return reply

    async def sign_off(self, *, mac: bool = True) -> Reply:
        """Sign off. With ``mac`` the 0820 carries a MAC, which is what makes the switch
        withdraw the keys (UnionPay terminals send none: their keys then stay)."""
        fields = self.base_fields("0820", "", "00", network_code="002")
        del fields["3"], fields["25"]
        return await self.send(fields, mac=mac)

    async def echo(self) -> Reply:
        fields = self.base_fields("0820", "", "00", network_code="301")
        del fields["3"], fields["25"]
        return await self.send(fields)

    def request(self, op: str, card: str, amount_fen: int | None = None, *, pin: str | None = None,
                track2: str | None = None, **extra: str) -> dict[str, str]:
        """A request as the terminal builds it. Operations that need the member's PIN
        carry a format 0 PIN block under the PIK (field 52, 53 = 26...)."""
        mti, proc, txn_type = OPS[op]
        fields = self.base_fields(mti, proc, txn_type)
        fields["2"] = card
        fields["22"] = "022"  # 2: no PIN entered
        fields["49"] = "156"
        if amount_fen is not None:
            fields["4"] = f"{amount_fen:012d}"
        pin = pin if pin is not None else self.default_pin
        if op in PIN_OPS and pin and self.pik is not None:
            fields["22"] = "021"  # 1: PIN entered
            fields["26"] = "12"
            fields["52"] = crypto.encrypt_pin_block(self.pik, pin, card).hex().upper()
            fields["53"] = "2600000000000000"
        if track2 is not None:
            fields["35"] = crypto.encrypt_track(self.tdk, track2) if self.tdk else track2
        fields.update(extra)
        return fields

    async def inquiry(self, card: str, *, pin: str | None = None) -> Reply:
        return await self.send(self.request("inquiry", card, pin=pin))

    async def accrue(self, card: str, amount_fen: int, *, tamper: bool = False) -> Reply:
        return await self.send(self.request("accrue", card, amount_fen), tamper=tamper)

    async def redeem(self, card: str, amount_fen: int, *, pin: str | None = None) -> Reply:
        return await self.send(self.request("redeem", card, amount_fen, pin=pin))

    async def cash_out(self, card: str, amount_fen: int, bank_card: str, *, pin: str | None = None) -> Reply:
        """Convert points into ``amount_fen`` credited to ``bank_card`` (through the bank host)."""
        return await self.send(self.request("cash_out", card, amount_fen, pin=pin, **{"48": bank_card}))

    async def insurance(self, card: str, premium_fen: int, policy: str, *, pin: str | None = None) -> Reply:
        """Pay ``premium_fen`` of the premium of ``policy`` with points (through the insurer host)."""
        return await self.send(self.request("insurance", card, premium_fen, pin=pin, **{"48": policy}))

    async def void(self, original: Reply) -> Reply:
        """Void an accrual or a redemption of this batch, by its reply."""
        op = "void_accrual" if original.request["60"][:2] == "22" else "void_redemption"
        f60 = original.request["60"]
        f61 = f60[2:8] + original.request["11"]
        return await self.send(self.request(
            op, original.request["2"], int(original.request["4"]), **{"37": original.rrn, "61": f61}
        ))

    async def refund(self, original: Reply, amount_fen: int) -> Reply:
        f60 = original.request["60"]
        date = original.fields.get("13", datetime.now().strftime("%m%d"))
        f61 = f60[2:8] + original.request["11"] + date
        return await self.send(self.request("refund", original.request["2"], amount_fen, **{"61": f61}))

    async def reverse(self, original: dict[str, str], reason: str = "98") -> Reply:
        """Send a reversal (0400): a copy of the original request with 39 = reason."""
        return await self.send(reversal_of(original, reason))
