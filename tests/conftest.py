"""Test harness: a real embedded PostgreSQL and the real switch on TCP.

The switch runs in a background thread with its own (uv)loop for the whole
session, exactly as ``pointswitch serve`` runs it; tests are clients on their
own loops and talk to it over loopback sockets only, and read the database
through their own connections.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from pointswitch import logs
from pointswitch.app import resolve_vault, running_switch
from pointswitch.config import Config, Limits, ListenerConfig
from pointswitch.ledger import TerminalProfile, admin
from pointswitch.ledger.database import EmbeddedServer
from pointswitch.ledger.vault import Vault
from pointswitch.simulators.terminal import TerminalClient

TEST_PIN = "123456"

# Every `pointswitch serve` a test starts serves its web layer on a free port, never on 8080.
os.environ.setdefault("POINTSWITCH_HTTP_PORT", "0")

DIALECTS = {"cup": ("cup", "binary2"), "iso87": ("iso87", "ascii4")}


@dataclass
class SwitchUnderTest:
    dsn: str
    ports: dict[str, int]
    config: Config
    loop: asyncio.AbstractEventLoop
    data_dir: Path
    embedded: EmbeddedServer
    vault: Vault
    master_key_hex: str
    http: tuple[str, int] = ("127.0.0.1", 0)  # the web layer's address
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _error: list[BaseException] = field(default_factory=list)


def _test_config() -> Config:
    cfg = Config()
    cfg.listeners = [
        ListenerConfig("cup", 0, "cup", "binary2", host="127.0.0.1"),
        ListenerConfig("iso87", 0, "iso87", "ascii4", host="127.0.0.1"),
    ]
    cfg.limits = Limits(max_frame_bytes=2048, idle_timeout_s=30, frame_timeout_s=3, request_timeout_s=10,
                        max_in_flight_per_connection=16, max_undecodable_frames=8)
    cfg.database.pool_max_size = 12
    # Every test shares 127.0.0.1 with every other: per-peer limits that a malformed-input
    # or attack test would trip are lifted here (tests of those limits run switches of their own).
    cfg.limits.max_connections_per_peer = 100_000
    cfg.limits.unauthenticated_idle_timeout_s = 30
    cfg.security.max_mac_failures_per_peer = 1_000_000
    cfg.security.max_mac_failures_per_terminal = 1_000_000
    cfg.security.sign_ons_per_minute = 100_000
    cfg.security.sign_ons_per_minute_per_peer = 100_000
    cfg.api.member_logins_per_minute_per_client = 100_000
    # Days are closed by the tests that close them, never by the clock passing a cut-off mid-run.
    cfg.day.auto_close = False
    cfg.http.port = 0  # a free port: several switches run side by side in one test session
    return cfg


@pytest.fixture(scope="session")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwitchUnderTest]:
    logs.configure(os.environ.get("POINTSWITCH_TEST_LOG_LEVEL", "warning"))
    data_dir = tmp_path_factory.mktemp("pointswitch-data")
    embedded = EmbeddedServer(data_dir)
    dsn = embedded.start()
    cfg = _test_config()
    cfg.database.data_dir = str(data_dir)
    vault = resolve_vault(cfg, embedded=True, env={})
    master_key_hex = (data_dir / "master.key").read_text().strip()
    ready = threading.Event()
    holder: dict[str, object] = {}

    def run() -> None:
        import uvloop

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        holder["loop"] = loop

        async def main() -> None:
            stop = asyncio.Event()
            holder["stop"] = stop
            async with running_switch(cfg, dsn, vault) as running:
                holder["ports"] = {name: port for name, (_h, port) in running.switch.bound.items()}
                assert running.web is not None and running.web.bound is not None
                holder["http"] = running.web.bound
                ready.set()
                await stop.wait()

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # surfaced to the test session
            holder["error"] = exc
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="switch", daemon=True)
    thread.start()
    assert ready.wait(60), "switch did not start"
    if "error" in holder:
        raise holder["error"]  # type: ignore[misc]
    sut = SwitchUnderTest(dsn, holder["ports"], cfg, holder["loop"], data_dir, embedded,  # type: ignore[arg-type]
                          vault, master_key_hex, holder["http"])  # type: ignore[arg-type]
    yield sut
    loop: asyncio.AbstractEventLoop = holder["loop"]  # type: ignore[assignment]
    loop.call_soon_threadsafe(holder["stop"].set)  # type: ignore[attr-defined]
    thread.join(30)
    embedded.stop()


_ids = itertools.count(1)
_databases = itertools.count(1)


async def fresh_database(sut: SwitchUnderTest, prefix: str) -> str:
    """A new empty database on the test server (kept: a test's data can be read after it); its DSN."""
    name = f"{prefix}{next(_databases)}_{os.getpid()}"
    con = await asyncpg.connect(sut.dsn)
    try:
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()
    dsn = sut.dsn.replace("/pointswitch?", f"/{name}?")
    assert dsn != sut.dsn
    return dsn


async def answer_or_none(term: TerminalClient, frame: bytes, timeout_s: float = 0.5) -> dict[str, str] | None:
    """Send a raw frame; the answer the switch gives to it, or None when it gives none."""
    await term.send_raw(frame)
    try:
        return await term.next_unmatched(timeout_s=timeout_s)
    except TimeoutError:
        return None


def scrypt_pin_hash(pin: str) -> str:
    """A PIN hash as versions before keyed verification values stored them."""
    import hashlib
    import secrets

    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${2**14}$8$1${salt.hex()}${digest.hex()}"


@dataclass
class Network:
    """A merchant with terminals and cards of its own, unique to one test."""

    dsn: str
    ports: dict[str, int]
    merchant_id: str
    terminal_ids: list[str]  # cup terminals (profile: cup, ECB MAC)
    cards: list[str]
    other_merchant_id: str
    tmks: dict[str, bytes]
    vault: Vault
    iso87_terminal_ids: list[str] = field(default_factory=list)  # profile: iso87, X9.19 MAC

    def terminal_id(self, n: int = 0, dialect: str = "cup") -> str:
        return (self.iso87_terminal_ids if dialect == "iso87" else self.terminal_ids)[n]

    def terminal(self, n: int = 0, dialect: str = "cup", merchant_id: str | None = None, *,
                 sign_on: bool = True, local_host: str | None = None) -> TerminalClient:
        """A terminal loaded with its master key; signs on when it connects unless told not to.
        ``local_host``: connect from that loopback address (a peer of its own)."""
        d, f = DIALECTS[dialect]
        tid = self.terminal_id(n, dialect)
        return TerminalClient("127.0.0.1", self.ports[dialect], tid, merchant_id or self.merchant_id,
                              dialect_name=d, framing_name=f, timeout_s=15, tmk=self.tmks[tid],
                              default_pin=TEST_PIN, sign_on_at_connect=sign_on, local_host=local_host)

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn)

    def card_index(self, card: str) -> str:
        """The card's key in the database (cards.card_index, requests.card_index)."""
        return self.vault.card_index(card)

    async def balance(self, card: str) -> int:
        con = await self.db()
        try:
            return int(await con.fetchval("SELECT points_balance FROM cards WHERE card_index = $1",
                                          self.card_index(card)))
        finally:
            await con.close()

    async def invariants(self) -> list[str]:
        con = await self.db()
        try:
            return await admin.check_invariants(con)
        finally:
            await con.close()


async def make_network(sut: SwitchUnderTest, *, terminals: int = 2, cards: int = 3, earn_rate: str = "1",
                       redeem_value: str = "1") -> Network:
    n = next(_ids)
    merchant = f"MT{n:013d}"
    other = f"N{n:014d}"
    con = await asyncpg.connect(sut.dsn)
    try:
        await admin.add_merchant(con, merchant, f"Merchant {n}", earn_rate, redeem_value=redeem_value)
        await admin.add_merchant(con, other, f"Other {n}", "1")
        tids, iso_tids, tmks = [], [], {}
        for i in range(terminals):
            for prefix, profile, ids in (("T", TerminalProfile("cup", "ecb"), tids),
                                         ("I", TerminalProfile("iso87", "x919", double_mak=True), iso_tids)):
                tid = f"{prefix}{n:05d}{i:02d}"
                added = await admin.add_terminal(con, sut.vault, tid, merchant, profile=profile)
                tmks[tid] = bytes.fromhex(added["tmk"])
                ids.append(tid)
        card_numbers = []
        for i in range(cards):
            card = f"62888{n:07d}{i:04d}"
            await admin.add_card(con, sut.vault, card, f"Member {n}-{i}", "13800000000", pin=TEST_PIN)
            card_numbers.append(card)
    finally:
        await con.close()
    return Network(sut.dsn, sut.ports, merchant, tids, card_numbers, other, tmks, sut.vault, iso_tids)


@pytest.fixture
async def network(switch: SwitchUnderTest) -> AsyncIterator[Network]:
    net = await make_network(switch)
    yield net
    assert await net.invariants() == [], "ledger invariants broken"


@pytest.fixture
def network_factory(switch: SwitchUnderTest):
    """Build extra networks with other earn rates or sizes inside a test."""
    made: list[Network] = []

    async def factory(**kwargs: object) -> Network:
        net = await make_network(switch, **kwargs)  # type: ignore[arg-type]
        made.append(net)
        return net

    return factory


@pytest.fixture(params=["cup", "iso87"])
def dialect(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def network_sync(switch: SwitchUnderTest) -> Iterator[Network]:
    """A network for synchronous (hypothesis-driven) tests, shared by a module."""
    net = asyncio.run(make_network(switch))
    yield net
    assert asyncio.run(net.invariants()) == []
