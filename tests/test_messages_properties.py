"""The outbox's promise, hunted by hypothesis: whatever the interleaving of workers
claiming, sending, and dying between a send and its commit, every message is
delivered, and a channel that honours the idempotency key takes each one once.

Real parts: the messages sit in PostgreSQL, two workers claim them with FOR
UPDATE SKIP LOCKED over their own connections, the catcher is an HTTP server,
and a crash is the worker's backend terminated while the gateway answers."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointswitch.app import database, resolve_vault
from pointswitch.config import MessagesConfig
from pointswitch.messages import Messenger, build_channels
from pointswitch.simulators.inbox import Inbox

from .conftest import SwitchUnderTest, _test_config

_examples = itertools.count(1)

# One step: which worker runs a batch ("both": at once), and whether the gateway's
# answer comes after that worker's connection was cut (a crash after the send).
STEP = st.tuples(st.sampled_from(["a", "b", "both"]), st.booleans())


@pytest.fixture(scope="module")
def outbox_db(switch: SwitchUnderTest) -> str:
    async def create() -> str:
        con = await asyncpg.connect(switch.dsn)
        try:
            await con.execute('CREATE DATABASE "outbox_properties"')
        finally:
            await con.close()
        return switch.dsn.replace("/pointswitch?", "/outbox_properties?")

    return asyncio.run(create())


async def _round(dsn: str, sut: SwitchUnderTest, messages: int, steps: list[tuple[str, bool]]) -> None:
    cfg = _test_config()
    cfg.database.data_dir = str(sut.data_dir)
    vault = resolve_vault(cfg, embedded=True, env={})
    inbox = Inbox()
    await inbox.start()
    crash_next: list[bool] = [False]

    async def crash(_record: dict[str, object]) -> None:
        if not crash_next[0]:
            return
        crash_next[0] = False
        con = await asyncpg.connect(dsn)
        try:
            await con.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE relation = 'outbox'::regclass"
                              " AND mode = 'RowShareLock' AND pid <> pg_backend_pid()")
        finally:
            await con.close()

    inbox.on_receive = crash
    settings_ = MessagesConfig(sms_url=inbox.sms_url, batch_size=2, quiet_hours_start="00:00",
                               quiet_hours_end="00:00", max_attempts=100)
    n = next(_examples)
    try:
        async with database(cfg, dsn, vault) as pool, aiohttp.ClientSession() as session:
            async with pool.acquire() as con:
                await con.execute("TRUNCATE outbox, contacts")
                contact = await con.fetchval(
                    "INSERT INTO contacts (recipient_kind, recipient_ref, channel, address_sealed, address_display)"
                    " VALUES ('merchant', 'M1', 'sms', $1, '***0001') RETURNING contact_id",
                    vault.seal(b"13700000001", "contact:merchant:M1:sms"))
                await con.executemany(
                    "INSERT INTO outbox (kind, recipient_kind, recipient_ref, contact_id, channel, idempotency_key,"
                    " payload, language) VALUES ('clearing_statement', 'merchant', 'M1', $1, 'sms', $2, '{}', 'en')",
                    [(contact, f"p{n}:{i}") for i in range(messages)])
            channels = build_channels(settings_, session)
            workers = {w: Messenger(pool, vault, settings_, time_zone="Asia/Shanghai", channels=channels)
                       for w in ("a", "b")}
            for who, crash_after_send in steps:
                crash_next[0] = crash_after_send
                runs = [workers[w].run_once() for w in (("a", "b") if who == "both" else (who,))]
                await asyncio.gather(*runs, return_exceptions=True)  # a cut connection: that batch rolls back
            for _ in range(messages + 2):  # then the workers run undisturbed until the outbox is empty
                crash_next[0] = False
                await workers["a"].run_once()
            async with pool.acquire() as con:
                undelivered = await con.fetchval("SELECT count(*) FROM outbox WHERE delivered_at IS NULL")
    finally:
        await inbox.stop()
    assert undelivered == 0, "a message was lost"
    keys = [r["key"] for r in inbox.received]
    assert sorted(keys) == sorted(f"p{n}:{i}" for i in range(messages)), "taken once each, none missing"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.integers(min_value=1, max_value=5), steps=st.lists(STEP, max_size=8))
def test_any_interleaving_of_claims_crashes_and_sends_delivers_each_message_once(switch, outbox_db, messages, steps):
    asyncio.run(_round(outbox_db, switch, messages, steps))
