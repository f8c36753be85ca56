"""Card data at rest: data keys, no card number, phone or holder name in clear in
the database (rows, statistics, table files) or the logs, and the conversion of
a database written by the version that stored them in clear."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pointswitch import logs
from pointswitch.app import running_switch
from pointswitch.codecs import crypto
from pointswitch.ledger import Outcome, Status, admin, audit
from pointswitch.ledger.carddata import unseal_card
from pointswitch.ledger.database import migrate
from pointswitch.ledger.vault import DATA_KEYS, DataKeysNotLoaded, Vault, VaultError

from .conftest import TEST_PIN, SwitchUnderTest, _test_config, make_network, scrypt_pin_hash
from .test_upstream import BANK_CARD, POLICY, _terminal, hosts, upstream_switch

# Card data of this module's own cards: distinctive, so that a find means a leak.
CARD_A, CARD_B = "6288770011223344", "628877001122334455"
HOLDERS = {CARD_A: "Ouyang Xiuying", CARD_B: "Zhuge Kongming"}
PHONES = {CARD_A: "13912345678", CARD_B: "13787654321"}
UNKNOWN_CARD = "6288770099887766"
_DIGIT_RUN = re.compile(rb"[0-9]{11,}")


# -- scanning a database for clear values ---------------------------------------------
async def _rows_as_text(con: asyncpg.Connection) -> dict[str, str]:
    """Every row of every table as PostgreSQL prints it (bytea as hex, jsonb as text),
    and the planner's statistics (most common values, histograms) after an ANALYZE."""
    tables = [r["table_name"] for r in await con.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        " AND table_type = 'BASE TABLE'")]
    out = {t: "\n".join(r[0] for r in await con.fetch(f'SELECT t::text FROM "{t}" t')) for t in tables}
    await con.execute("ANALYZE")
    out["pg_stats"] = "\n".join(str(tuple(r)) for r in await con.fetch(
        "SELECT tablename, attname, most_common_vals::text, histogram_bounds::text FROM pg_stats"
        " WHERE schemaname = 'public'"))
    return out


async def _table_files(con: asyncpg.Connection) -> dict[str, bytes]:
    """The bytes of every relation file of the database (catalogs included), after a
    checkpoint wrote every dirty page: where dropped columns and dead rows linger."""
    await con.execute("CHECKPOINT")
    rows = await con.fetch("SELECT relname, pg_relation_filepath(oid) AS path FROM pg_class"
                           " WHERE pg_relation_filepath(oid) IS NOT NULL AND relpersistence <> 't'")
    files = {}
    for r in rows:
        data = await con.fetchval("SELECT pg_read_binary_file($1, true)", r["path"])
        if data:
            files[r["relname"]] = bytes(data)
    return files


def _found_in_text(texts: dict[str, str], clear: set[str]) -> list[str]:
    return [f"{value!r} in {where}" for where, text in texts.items() for value in clear
            if value in text or value.encode().hex() in text]


def _found_in_files(files: dict[str, bytes], clear: set[str]) -> list[str]:
    """Digit values (card and phone numbers) by scanning digit runs once; other values directly."""
    digits = {v for v in clear if v.isdigit()}
    found = []
    for where, data in files.items():
        runs = {m.group().decode() for m in _DIGIT_RUN.finditer(data)}
        found += [f"{v!r} in file of {where}" for v in digits if any(v in run for run in runs)]
        found += [f"{v!r} in file of {where}" for v in clear - digits if v.encode() in data]
    return found


async def _clear_card_data(con: asyncpg.Connection, vault: Vault) -> set[str]:
    """Every card number, holder name and phone the database holds, unsealed."""
    rows = await con.fetch("SELECT card_index, pan_sealed, holder_sealed, phone_sealed FROM cards")
    return {v for r in rows for v in unseal_card(vault, r).values() if v}


# -- data keys --------------------------------------------------------------------------
async def test_data_keys_are_sealed_in_the_database_and_load_into_another_vault_with_the_master_key(switch):
    con = await asyncpg.connect(switch.dsn)
    try:
        rows = {r["name"]: bytes(r["sealed"]) for r in await con.fetch("SELECT name, sealed FROM vault_keys")}
        assert set(rows) == set(DATA_KEYS)
        for name, sealed in rows.items():
            assert switch.vault.data_key(name) not in sealed, "a data key is stored only sealed"
            assert len(switch.vault.data_key(name)) == 32
        assert len({switch.vault.data_key(n) for n in DATA_KEYS}) == len(DATA_KEYS), "one key per purpose"

        fresh = Vault(bytes.fromhex(switch.master_key_hex))
        with pytest.raises(DataKeysNotLoaded, match="load_data_keys"):
            fresh.card_index(CARD_A)
        with pytest.raises(DataKeysNotLoaded):
            fresh.fingerprint(b"x")
        await fresh.load_data_keys(con)
        assert fresh.card_index(CARD_A) == switch.vault.card_index(CARD_A), "same database, same index"
        assert re.fullmatch(r"[0-9a-f]{64}", fresh.card_index(CARD_A))
        assert fresh.card_index(CARD_A) != hashlib.sha256(CARD_A.encode()).hexdigest(), "keyed, not a bare hash"
        assert fresh.data_key("pvk") == switch.vault.data_key("pvk")

        with pytest.raises(VaultError):
            await Vault(secrets.token_bytes(32)).load_data_keys(con)  # another master key opens none of them
        assert {r["name"] for r in await con.fetch("SELECT name FROM vault_keys")} == set(DATA_KEYS)
    finally:
        await con.close()


# -- a realistic run: nothing in clear in the database or the logs ------------------------
@dataclass
class Run:
    clear: set[str]  # card numbers (ours, every card's, the bank card), phones, holder names
    tmks: set[str]  # the terminals' master keys, hex
    rows: dict[str, str]
    files: dict[str, bytes]
    log_text: str


async def _realistic_run(sut: SwitchUnderTest) -> Run:
    net = await make_network(sut, cards=0)
    con = await asyncpg.connect(sut.dsn)
    try:
        for card in (CARD_A, CARD_B):
            await admin.add_card(con, sut.vault, card, HOLDERS[card], PHONES[card], pin=TEST_PIN)
        await admin.set_card_status(con, sut.vault, CARD_B, "blocked")
        await admin.set_card_status(con, sut.vault, CARD_B, "active")
        await admin.set_pin(con, sut.vault, CARD_B, TEST_PIN)
        await admin.show_card(con, sut.vault, CARD_A, reveal=True)
    finally:
        await con.close()
    async with hosts() as (bank, insurer), upstream_switch(sut, bank, insurer) as running:
        async with _terminal(net, 0, running) as term:
            accrual = await term.accrue(CARD_A, 100_000)
            assert (await term.accrue(CARD_B, 50_000)).rc == "00"
            redemption = await term.redeem(CARD_A, 1000)
            assert (await term.void(redemption)).rc == "00"
            assert (await term.refund(accrual, 20_000)).rc == "00"
            assert (await term.send(accrual.request)).rrn == accrual.rrn, "a retransmission is replayed"
            reversed_ = await term.accrue(CARD_A, 3000)
            assert (await term.reverse(reversed_.request)).rc == "00"
            early = term.request("accrue", CARD_B, 700)
            assert (await term.reverse(early)).rc == "00"
            assert (await term.send(early)).rc == "22", "the late original of a reversal is not posted"
            assert (await term.accrue(UNKNOWN_CARD, 100)).rc == "14"
            assert (await term.redeem(CARD_A, 100, pin="000000")).rc == "55"
            assert (await term.cash_out(CARD_A, 200, BANK_CARD)).rc == "00"
            assert (await term.insurance(CARD_B, 100, POLICY)).rc == "00"
    assert await net.invariants() == []
    con = await asyncpg.connect(sut.dsn)
    try:
        clear = await _clear_card_data(con, sut.vault) | {UNKNOWN_CARD, BANK_CARD}
        assert {CARD_A, CARD_B, HOLDERS[CARD_A], PHONES[CARD_B]} <= clear
        tmks = {k.hex() for k in net.tmks.values()} | {k.hex().upper() for k in net.tmks.values()}
        return Run(clear, tmks, await _rows_as_text(con), await _table_files(con), "")
    finally:
        await con.close()


@pytest.fixture(scope="module")
def realistic_run(switch: SwitchUnderTest) -> Iterator[Run]:
    captured = io.StringIO()
    logs.configure("debug", json=True, stream=captured)
    try:
        run = asyncio.run(_realistic_run(switch))
    finally:
        logs.configure("warning")
    run.log_text = captured.getvalue()
    yield run


def test_no_card_number_phone_or_holder_name_is_stored_in_clear(realistic_run):
    assert len(realistic_run.rows["cards"].splitlines()) >= 2 and realistic_run.rows["audit_log"]
    assert _found_in_text(realistic_run.rows, realistic_run.clear) == []
    assert "cards" in realistic_run.files and "pg_statistic" in realistic_run.files
    assert _found_in_files(realistic_run.files, realistic_run.clear) == []


def test_log_lines_carry_no_card_number_phone_or_holder_name(realistic_run):
    lines = [json.loads(line) for line in realistic_run.log_text.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "request" for e in lines), "debug lines were captured"
    assert any(e.get("event") == "wrong PIN" for e in lines)
    assert "628877******3344" in realistic_run.log_text, "the card appears masked"
    assert [v for v in realistic_run.clear if v in realistic_run.log_text] == []
    assert [k for k in realistic_run.tmks if k in realistic_run.log_text] == [], "nor a terminal master key"


# -- a database of the previous version --------------------------------------------------
@contextlib.asynccontextmanager
async def _new_database(sut: SwitchUnderTest) -> AsyncIterator[str]:
    """A database of its own on the test server; its DSN. Dropped at the end."""
    name = f"legacy_{secrets.token_hex(4)}"
    con = await asyncpg.connect(sut.dsn)
    try:
        await con.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(sut.dsn)._replace(path=f"/{name}"))
    finally:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await con.close()


LEGACY_CARD, LEGACY_HOLDER, LEGACY_PHONE = "6288660012345678", "Sima Guang", "13655554444"
LEGACY_UNKNOWN = "6288660087654321"  # a declined request for a card that was never issued
MERCHANT, TERMINAL = "MLEGACY00000001", "TLEG0001"


def _old_fingerprint(card: str, amount_fen: int) -> bytes:
    """The request fingerprint as the previous version stored it: bare SHA-256."""
    content = {"op": "accrue", "merchant": MERCHANT, "card": card, "amount": amount_fen, "original": None}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).digest()


async def _write_the_old_way(con: asyncpg.Connection, vault: Vault, tmk: bytes) -> None:
    """Schema 0001-0003 and rows as the previous version wrote them: clear card data."""
    assert await migrate(con, vault, up_to=3) == [
        "0001_initial.sql", "0002_terminal_security.sql", "0003_upstream.sql"]
    await vault.check_database(con)
    issued = await con.fetchval("INSERT INTO accounts (kind, owner) VALUES ('merchant_issued', $1)"
                                " RETURNING account_id", MERCHANT)
    redeemed = await con.fetchval("INSERT INTO accounts (kind, owner) VALUES ('merchant_redeemed', $1)"
                                  " RETURNING account_id", MERCHANT)
    await con.execute("INSERT INTO merchants (merchant_id, name, earn_rate_points_per_yuan, issued_account_id,"
                      " redeemed_account_id) VALUES ($1, 'Old Shop', 1, $2, $3)", MERCHANT, issued, redeemed)
    await con.execute("INSERT INTO terminals (terminal_id, merchant_id, tmk_sealed, tmk_kcv) VALUES ($1, $2, $3, $4)",
                      TERMINAL, MERCHANT, vault.seal(tmk, f"tmk:{TERMINAL}"), crypto.check_value(tmk).hex().upper())
    card_account = await con.fetchval("INSERT INTO accounts (kind, owner) VALUES ('card', $1) RETURNING account_id",
                                      LEGACY_CARD)
    await con.execute("INSERT INTO cards (card_number, holder_name, phone, pin_hash, account_id, points_balance)"
                      " VALUES ($1, $2, $3, $4, $5, 120)", LEGACY_CARD, LEGACY_HOLDER, LEGACY_PHONE,
                      scrypt_pin_hash(TEST_PIN), card_account)
    for trace, amount in ((10, 10_000), (11, 2_000)):  # two accruals: 100 + 20 points
        outcome = Outcome(Status.APPROVED, points_moved=amount // 100, points_balance=120, rrn=f"9{trace:011d}",
                          auth_code="123456", host_time="2026-01-01T10:00:00+08:00")
        request_id = await con.fetchval(
            "INSERT INTO requests (request_key, fingerprint, operation, state, status, terminal_id, merchant_id,"
            " card_number, amount_fen, points, batch, trace, rrn, outcome) VALUES ($1, $2, 'accrue', 'approved',"
            " 'approved', $3, $4, $5, $6, $7, 1, $8, $9, $10) RETURNING request_id",
            f"{TERMINAL}:000001:{trace:06d}", _old_fingerprint(LEGACY_CARD, amount), TERMINAL, MERCHANT, LEGACY_CARD,
            amount, amount // 100, trace, outcome.rrn, outcome.to_json())
        await con.execute("INSERT INTO postings (request_id, reason, debit_account_id, credit_account_id,"
                          " amount_points) VALUES ($1, 'accrue', $2, $3, $4)", request_id, issued, card_account,
                          amount // 100)
    declined = Outcome(Status.UNKNOWN_CARD, rrn="900000000012", host_time="2026-01-01T10:01:00+08:00")
    await con.execute(
        "INSERT INTO requests (request_key, fingerprint, operation, state, status, terminal_id, merchant_id,"
        " card_number, amount_fen, batch, trace, rrn, outcome) VALUES ($1, $2, 'accrue', 'declined',"
        " 'unknown_card', $3, $4, $5, 100, 1, 12, $6, $7)", f"{TERMINAL}:000001:000012",
        _old_fingerprint(LEGACY_UNKNOWN, 100), TERMINAL, MERCHANT, LEGACY_UNKNOWN, declined.rrn, declined.to_json())
    await con.execute("ANALYZE")  # the planner's statistics now hold the clear card number too
    stats = await con.fetchval("SELECT string_agg(most_common_vals::text, ' ') FROM pg_stats"
                               " WHERE tablename = 'requests' AND attname = 'card_number'")
    assert LEGACY_CARD in stats, "precondition: the old database holds the card number in its statistics"


async def test_a_database_of_the_previous_version_is_converted_at_start_up(switch):
    vault, tmk = Vault(secrets.token_bytes(32)), crypto.generate_key(16)
    clear = {LEGACY_CARD, LEGACY_HOLDER, LEGACY_PHONE, LEGACY_UNKNOWN}
    async with _new_database(switch) as dsn:
        con = await asyncpg.connect(dsn)
        try:
            await _write_the_old_way(con, vault, tmk)
            assert _found_in_files(await _table_files(con), clear), "precondition: clear data in the files"
        finally:
            await con.close()

        cfg = _test_config()
        cfg.database.data_dir = str(switch.data_dir)
        async with running_switch(cfg, dsn, vault) as running:  # start-up migrates and converts
            port = running.address("cup")[1]
            async with _terminal_of(port, tmk) as term:
                balance = await term.inquiry(LEGACY_CARD)
                term.trace = 9  # the terminal retransmits its request with trace 10
                replay = await term.accrue(LEGACY_CARD, 10_000)
                term.trace = 11
                declined_again = await term.accrue(LEGACY_UNKNOWN, 100)
                term.trace = 20
                accrual = await term.accrue(LEGACY_CARD, 500)
                redemption = await term.redeem(LEGACY_CARD, 25)

        con = await asyncpg.connect(dsn)
        try:
            shown = await admin.show_card(con, vault, LEGACY_CARD, reveal=True)
            pin_stored = await con.fetchval("SELECT pin_hash FROM cards WHERE card_index = $1",
                                            vault.card_index(LEGACY_CARD))
            problems = await admin.check_invariants(con)
            columns = {(r["table_name"], r["column_name"]) for r in await con.fetch(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'")}
            converted = [e for e in await audit.entries(con) if e["action"] == "migrate.card_data"]
            files, rows = await _table_files(con), await _rows_as_text(con)  # files before ANALYZE
        finally:
            await con.close()

    assert (balance.rc, balance.points_balance) == ("00", 120), "the card works, its balance carried over"
    assert (replay.rc, replay.rrn, replay.points_balance) == ("00", "900000000010", 120), \
        "a retransmission of a request of the old version is recognised (keyed fingerprint) and replayed"
    assert declined_again.rc == "14", "the declined request of a never-issued card replays its decline"
    assert (accrual.rc, accrual.points_balance) == ("00", 125)
    assert (redemption.rc, redemption.points_balance) == ("00", 100)
    assert pin_stored.startswith("pvv1$"), "the old scrypt hash is replaced at the first right PIN"
    assert (shown["card_number"], shown["holder_name"], shown["phone"]) == (LEGACY_CARD, LEGACY_HOLDER,
                                                                             LEGACY_PHONE)
    assert [p["points"] for p in shown["postings"]] == [-25, 5, 20, 100]
    assert problems == []
    assert {("cards", "card_number"), ("cards", "holder_name"), ("cards", "phone"),
            ("requests", "card_number")}.isdisjoint(columns)
    assert [e["details"] for e in converted] == [{"cards": 1, "card_numbers": 2, "fingerprints": 3}]
    assert _found_in_text(rows, clear) == [], "no clear value in any row or statistic"
    assert _found_in_files(files, clear) == [], "nor in any table or catalog file"


def _terminal_of(port: int, tmk: bytes):
    from pointswitch.simulators.terminal import TerminalClient

    return TerminalClient("127.0.0.1", port, TERMINAL, MERCHANT, tmk=tmk, default_pin=TEST_PIN,
                          sign_on_at_connect=True, timeout_s=15)
