"""A switch that talks to people: its own database, a merchant with a terminal,
cards, and ``[messages]`` pointed at a local catcher (``simulators.inbox``).

Each test gets a fresh database (on the shared embedded server) so that its
outbox, contacts and business days are its own."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from pointswitch.app import Running, resolve_vault, running_switch
from pointswitch.ledger import admin, contacts
from pointswitch.ledger.vault import Vault
from pointswitch.simulators.inbox import Inbox
from pointswitch.simulators.terminal import TerminalClient

from .conftest import TEST_PIN, SwitchUnderTest, _test_config, fresh_database

MERCHANT, OTHER_MERCHANT, TERMINAL = "MMSG00000000001", "MMSG00000000002", "TMSG0001"
CARDS = ["6288660000000017", "6288660000000025", "6288660000000033"]
PHONES = ["13900000017", "13900000025", "13900000033"]


@dataclass
class MessagingSwitch:
    running: Running
    dsn: str
    inbox: Inbox
    tmk: bytes
    clearing_dir: Path
    master_key_hex: str
    vault: Vault

    def terminal(self) -> TerminalClient:
        return TerminalClient("127.0.0.1", self.running.address("cup")[1], TERMINAL, MERCHANT, timeout_s=15,
                              tmk=self.tmk, default_pin=TEST_PIN, sign_on_at_connect=True)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        con = await asyncpg.connect(self.dsn)
        try:
            return await con.fetch(sql, *args)
        finally:
            await con.close()

    async def subscribe(self, card: str, channel: str, address: str, language: str = "zh-CN") -> None:
        async with self.running.pool.acquire() as con:
            await contacts.add_card_contact(con, self.vault, card, channel, address, language)

    async def outbox(self) -> list[asyncpg.Record]:
        return await self.fetch("SELECT * FROM outbox ORDER BY message_id")


async def until(check: Callable[[], Any], timeout_s: float = 15.0, what: str = "") -> Any:
    """Poll ``check`` (a function, or one returning an awaitable) until it gives something true; that."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}; last: {value!r}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def messaging_switch(sut: SwitchUnderTest, tmp_path: Path, *, secrets: dict[str, bytes] | None = None,
                           **settings: Any) -> AsyncIterator[MessagingSwitch]:
    inbox = Inbox(secrets=dict(secrets or {}))
    await inbox.start()
    dsn = await fresh_database(sut, "msgs")
    cfg = _test_config()
    cfg.database.data_dir = str(sut.data_dir)
    cfg.day.clearing_dir = str(tmp_path / "clearing")
    m = cfg.messages
    m.sms_url = inbox.sms_url
    m.smtp_host, m.smtp_port = inbox.bound_smtp
    m.quiet_hours_start = m.quiet_hours_end = "00:00"  # none, unless a test asks for them
    m.poll_interval_s, m.backoff_initial_s, m.backoff_max_s = 0.2, 0.2, 1.0
    for key, value in settings.items():
        setattr(m, key, value)
    m.validate()
    vault = resolve_vault(cfg, embedded=True, env={})
    try:
        async with running_switch(cfg, dsn, vault) as running:
            async with running.pool.acquire() as c:
                await admin.add_merchant(c, MERCHANT, "Messages shop", "1", issue_price="0.5")
                await admin.add_merchant(c, OTHER_MERCHANT, "Quiet shop", "1")
                tmk = bytes.fromhex((await admin.add_terminal(c, vault, TERMINAL, MERCHANT))["tmk"])
                for card, phone in zip(CARDS, PHONES, strict=True):
                    await admin.add_card(c, vault, card, "Msg Member", phone, pin=TEST_PIN)
            yield MessagingSwitch(running, dsn, inbox, tmk, Path(cfg.day.clearing_dir), sut.master_key_hex,
                                  vault)
    finally:
        await inbox.stop()
