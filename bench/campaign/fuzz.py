"""A fuzzer on the switch's listener: random bytes and mutated valid frames, each connection from
a loopback address of its own (127.0.0.2 and up, so that what the guard does to the fuzzer's
addresses never touches the load terminals on 127.0.0.1).

Valid frames come from terminals of the fuzzer's own (signed on with their master key, so that
MAC'd frames are genuine before they are mutated); some mutations are made to field values and
signed again, so that they pass the MAC and reach routing and the ledger. They use the fuzzer's
own cards: the reconciliation counts their effect on a card apart from the load terminals'.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections import Counter
from dataclasses import dataclass, field

from pointswitch.codecs import EncodeFailure
from pointswitch.simulators.terminal import TerminalClient, TerminalError

from .common import say
from .terminals import BANK_CARD, POLICY, Progress

FIELDS_TO_MUTATE = ("2", "3", "4", "11", "22", "25", "26", "35", "37", "41", "42", "48", "49", "52", "53", "60",
                    "61", "62", "63", "70", "90")


@dataclass
class FuzzStats:
    frames: int = 0
    connections: int = 0
    closed_by_switch: int = 0
    connect_refused: int = 0
    bytes_back: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    half_frames: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class Fuzzer:
    def __init__(self, port: int, merchant_id: str, terminals: dict[str, bytes], cards: list[str], pin: str,
                 rng: random.Random, *, frames: int, max_rate: float, progress: Progress, workers: int = 4) -> None:
        self.port = port
        self.merchant_id = merchant_id
        self.terminals = terminals
        self.cards = cards
        self.pin = pin
        self.rng = rng
        self.target = frames
        self.max_rate = max_rate
        self.progress = progress
        self.workers = workers
        self.stats = FuzzStats()
        self.corpus: list[bytes] = []  # encoded valid messages (no length header)
        self.templates: list[tuple[TerminalClient, dict[str, str]]] = []  # (signer, fields) to mutate and sign
        self._signed_on_at = 0.0
        self._stop = False

    # -- valid material -----------------------------------------------------------------------
    async def prepare(self) -> None:
        """Sign the fuzzer's terminals on and build the corpus; again every minute (sign-on limits
        allow it), since a mutated frame may withdraw their keys."""
        corpus: list[bytes] = []
        templates: list[tuple[TerminalClient, dict[str, str]]] = []
        for tid, tmk in self.terminals.items():
            client = TerminalClient("127.0.0.1", self.port, tid, self.merchant_id, timeout_s=5.0, tmk=tmk,
                                    default_pin=self.pin, local_host="127.0.0.2")
            client.trace = self.rng.randrange(1, 900000)
            try:
                await client.connect()
                reply = await client.sign_on()
                if reply.rc == "00":
                    await client.inquiry(self.cards[0])  # its first MAC'd message makes the new keys the ones in use
            except (TerminalError, OSError, TimeoutError):
                continue
            finally:
                await client.close()
            card = self.rng.choice(self.cards)
            requests = [
                client.request("accrue", card, 1200),
                client.request("redeem", card, 300),
                client.request("inquiry", card),
                client.request("void_accrual", card, 1200, **{"61": f"000001{client.trace - 4:06d}"}),
                client.request("refund", card, 100, **{"61": f"000001{client.trace - 5:06d}0101"}),
                client.request("cash_out", card, 200, **{"48": BANK_CARD}),
                client.request("insurance", card, 300, **{"48": POLICY}),
            ]
            sign_on = client.base_fields("0800", "", "00", network_code="003")
            del sign_on["3"], sign_on["25"]
            echo = client.base_fields("0820", "", "00", network_code="301")
            del echo["3"], echo["25"]
            reversal = {k: v for k, v in requests[0].items() if k not in ("52", "64")} | {"t": "0400", "39": "98"}
            mac = client._mac_fn()
            for fields in [*requests, reversal]:
                templates.append((client, fields))
                corpus.append(client.dialect.encode(fields, sign=mac))
            for fields in (sign_on, echo):
                corpus.append(client.dialect.encode(fields))
        if corpus:  # swapped at once: the other workers go on with the previous ones meanwhile
            self.corpus, self.templates = corpus, templates
        self._signed_on_at = time.monotonic()
        if not corpus:
            say("fuzzer: none of its terminals could sign on; random frames only")

    # -- frames ------------------------------------------------------------------------------
    def _random_bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def _mutate_bytes(self, payload: bytes) -> bytes:
        out = bytearray(payload)
        for _ in range(self.rng.randint(1, 4)):
            how = self.rng.randrange(7)
            at = self.rng.randrange(len(out)) if out else 0
            if how == 0 and out:
                out[at] ^= 1 << self.rng.randrange(8)
            elif how == 1 and out:
                out[at] = self.rng.randrange(256)
            elif how == 2:
                out[at:at] = self._random_bytes(self.rng.randint(1, 8))
            elif how == 3 and len(out) > 1:
                del out[at:at + self.rng.randint(1, 8)]
            elif how == 4 and out:
                n = self.rng.randint(1, 16)
                out[at:at] = out[at:at + n]
            elif how == 5 and out:
                del out[self.rng.randint(1, len(out)):]
            elif how == 6 and len(out) > 16:
                # the bitmap (after the cup envelope and the MTI): flip one bit of it
                pos = self.rng.randrange(min(len(out), 13), min(len(out), 21))
                out[pos] ^= 1 << self.rng.randrange(8)
        return bytes(out) or b"\x00"

    def _mutate_fields(self) -> bytes | None:
        client, fields = self.rng.choice(self.templates)
        mutated = dict(fields)
        for _ in range(self.rng.randint(1, 3)):
            key = self.rng.choice(FIELDS_TO_MUTATE)
            how = self.rng.randrange(6)
            if how == 0:
                mutated.pop(key, None)
            elif how == 1:
                mutated[key] = "".join(self.rng.choices(string.digits, k=self.rng.randint(0, 30)))
            elif how == 2:
                mutated[key] = "".join(self.rng.choices(string.printable, k=self.rng.randint(0, 40)))
            elif how == 3 and key in mutated:
                value = mutated[key]
                mutated[key] = value[::-1] if self.rng.random() < 0.5 else value * 2
            elif how == 4:
                mutated[key] = "9" * self.rng.randint(1, 20)
            else:
                mutated["t"] = self.rng.choice(["0100", "0200", "0220", "0320", "0400", "0420", "0500", "0800",
                                                "0820", "0210", "9999", "02x0"])
        try:
            return client.dialect.encode(mutated, sign=client._mac_fn())
        except (EncodeFailure, ValueError, KeyError, TypeError, IndexError):
            return None

    def frame(self) -> tuple[str, bytes, bool]:
        """(kind, bytes to write, whether the connection can go on after it)."""
        roll = self.rng.random()
        framing = binary2_frame
        if roll < 0.05 or not self.corpus:
            if roll < 0.05:
                return "raw", self._random_bytes(self.rng.randint(1, 64)), False
            return "random", framing(self._random_bytes(self.rng.randint(1, 400))), True
        if roll < 0.25:
            return "random", framing(self._random_bytes(self.rng.randint(1, 400))), True
        if roll < 0.30:
            payload = self.rng.choice(self.corpus)
            wrong = max(1, len(payload) + self.rng.choice([-3, -1, 1, 7, 200]))
            return "bad_length", wrong.to_bytes(2, "big") + payload, False
        if roll < 0.50 and self.templates:
            encoded = self._mutate_fields()
            if encoded is not None:
                return "fields", framing(encoded), True
        return "mutated", framing(self._mutate_bytes(self.rng.choice(self.corpus))), True

    # -- connections -------------------------------------------------------------------------
    def _allowed(self) -> int:
        return int(self.target * min(1.0, self.progress.fraction() + 0.02))

    async def _drain(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(65536):
                self.stats.bytes_back += len(data)
        except (OSError, ConnectionError):
            pass

    async def _connection(self) -> None:
        address = f"127.0.0.{self.rng.randint(2, 254)}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port, local_addr=(address, 0)), 2.0)
        except (OSError, TimeoutError):
            self.stats.connect_refused += 1
            await asyncio.sleep(0.2)
            return
        self.stats.connections += 1
        drain = asyncio.get_running_loop().create_task(self._drain(reader))
        try:
            for _ in range(self.rng.randint(1, 100)):
                if self._stop or self.stats.frames >= self._allowed():
                    break
                kind, data, go_on = self.frame()
                if drain.done():
                    self.stats.closed_by_switch += 1
                    break
                writer.write(data)
                self.stats.frames += 1
                self.progress.fuzzed = self.stats.frames
                self.stats.kinds[kind] += 1
                await writer.drain()
                if not go_on:
                    break
                if self.max_rate:
                    await asyncio.sleep(self.workers / self.max_rate)
            await asyncio.sleep(0.005)
        except (OSError, ConnectionError, RuntimeError):  # RuntimeError: uvloop's closed transport
            self.stats.closed_by_switch += 1
        finally:
            writer.close()
            drain.cancel()
            try:
                await drain
            except (asyncio.CancelledError, Exception):
                pass

    async def _worker(self) -> None:
        while not self._stop:
            if self.stats.frames >= self._allowed():
                if self.progress.stopped:
                    return
                await asyncio.sleep(0.05)
                continue
            if time.monotonic() - self._signed_on_at > 60.0:
                self._signed_on_at = time.monotonic()
                await self.prepare()
            try:
                await self._connection()
            except Exception as exc:  # a fuzzer's own slip must not end the campaign: counted, shown
                self.stats.errors[f"{type(exc).__name__}: {exc}"[:100]] += 1

    async def run(self) -> None:
        if not self.target:
            return
        await self.prepare()
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))

    def stop(self) -> None:
        self._stop = True

    # -- half frames (the fault "connection dropped mid-frame", without a terminal behind it) ----
    async def half_frame(self) -> None:
        payload = self.rng.choice(self.corpus) if self.corpus else self._random_bytes(80)
        data = binary2_frame(payload)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 2.0)
        except (OSError, TimeoutError):
            return
        try:
            writer.write(data[: self.rng.randint(1, len(data) - 1)])
            await writer.drain()
            self.stats.half_frames += 1
        except (OSError, ConnectionError, RuntimeError):
            pass
        finally:
            writer.close()


def binary2_frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload
