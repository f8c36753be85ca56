"""Terminal security end to end: key exchange, MAC, PIN, sessions, track 2, logs."""

from __future__ import annotations

import asyncio
import io
import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointswitch import logs
from pointswitch.codecs import crypto, framing
from pointswitch.codecs import dialect as get_dialect
from pointswitch.codecs.subfields import parse_62
from pointswitch.ledger import admin
from pointswitch.simulators.scenario import DEMO_CARD, DEMO_MERCHANTS, DEMO_PIN, run_scenario

from .conftest import TEST_PIN, answer_or_none

CUP = get_dialect("cup")
BIN2 = framing("binary2")


async def _requests(network, card: str) -> int:
    con = await network.db()
    try:
        return int(await con.fetchval(
            "SELECT count(*) FROM requests WHERE card_index = $1 AND state = 'approved'", network.card_index(card)))
    finally:
        await con.close()


# -- sign-on and key exchange ------------------------------------------------------
async def test_sign_on_layouts_and_check_values_for_each_key_scheme(network):
    tmk = network.tmks[network.terminal_ids[0]]
    con = await network.db()
    try:  # single-length keys (001) only where the terminal's profile allows them
        await admin.set_terminal_profile(con, network.terminal_ids[0], single_des_allowed=True)
    finally:
        await con.close()
    for code, length, tdk in (("001", 24, False), ("003", 40, False), ("004", 60, True)):
        async with network.terminal(0, sign_on=False) as term:
            reply = await term.sign_on(code)
        assert reply.rc == "00"
        raw = bytes.fromhex(reply.fields["62"])
        assert len(raw) == length, code
        pik, mak, tdk_block = parse_62(code, raw)
        for block in (pik, mak) + ((tdk_block,) if tdk else ()):
            clear = crypto.decrypt(tmk, block.under_tmk)
            assert crypto.check_value(clear) == block.check_value, f"{code}: check value"
        assert len(crypto.decrypt(tmk, pik.under_tmk)) == (8 if code == "001" else 16)
        if code != "001":
            assert raw[28:36] == bytes(8), "003/004: the MAK is followed by eight zero bytes"
        assert (tdk_block is not None) == tdk
        assert reply.fields["60"][2:8] == "000001"
        assert "64" not in reply.fields, "management messages carry no MAC"


async def test_keys_are_sealed_at_rest_and_never_stored_in_clear(network):
    async with network.terminal(0) as term:
        pik, mak = term.pik, term.mak
    tmk = network.tmks[network.terminal_ids[0]]
    con = await network.db()
    try:
        row = await con.fetchrow("SELECT * FROM terminals WHERE terminal_id = $1", network.terminal_ids[0])
        card = await con.fetchrow("SELECT pin_hash FROM cards WHERE card_index = $1",
                                  network.card_index(network.cards[0]))
    finally:
        await con.close()
    dump = repr(dict(row)).encode() + b"".join(v for v in row.values() if isinstance(v, bytes))
    for key in (tmk, pik, mak):
        assert key not in dump and key.hex().encode() not in dump.lower()
    assert row["tmk_kcv"] == crypto.check_value(tmk).hex().upper()
    assert card["pin_hash"].startswith("pvv1$") and TEST_PIN not in card["pin_hash"]


async def test_a_terminal_that_never_signed_on_is_declined_A0_and_asked_to_sign_on(network):
    card = network.cards[0]
    async with network.terminal(0, sign_on=False) as term:
        reply = await term.accrue(card, 1000)
        echo = await term.echo()
    assert reply.rc == "A0"
    assert reply.envelope.processing_requirement == 3
    assert echo.rc == "00", "echo works without sign-on"
    assert await network.balance(card) == 0


async def test_sign_off_invalidates_the_working_keys(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        assert (await term.accrue(card, 1000)).rc == "00"
        assert (await term.sign_off()).rc == "00"
        after = await term.accrue(card, 1000)
    assert after.rc == "A0" and after.envelope.processing_requirement == 3
    assert await network.balance(card) == 10


async def test_a_second_sign_on_rotates_the_keys_and_the_old_mak_stops_working(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        old_mak = term.mak
        await term.sign_on()
        assert term.mak != old_mak
        fresh = await term.accrue(card, 1000)
        term.mak = old_mak
        stale = await term.accrue(card, 1000)
    assert fresh.rc == "00"
    assert stale.rc == "A0"
    assert await network.balance(card) == 10


async def test_terminal_rekey_requires_a_new_sign_on_with_the_new_master_key(network):
    tid = network.terminal_ids[0]
    con = await network.db()
    try:
        rekeyed = await admin.rekey_terminal(con, network.vault, tid)
    finally:
        await con.close()
    new_tmk = bytes.fromhex(rekeyed["tmk"])
    assert new_tmk != network.tmks[tid]
    async with network.terminal(0, sign_on=False) as term:
        assert (await term.accrue(network.cards[0], 100)).rc == "A0", "the old session died with the old key"
        term.tmk = new_tmk
        assert (await term.sign_on()).rc == "00"
        assert (await term.accrue(network.cards[0], 100)).rc == "00"


# -- MAC -------------------------------------------------------------------------------
async def test_mac_is_required_and_checked_and_the_response_mac_verifies(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        good = await term.accrue(card, 1000)
        tampered = await term.accrue(card, 1000, tamper=True)
        mak, term.mak = term.mak, None
        missing = await term.accrue(card, 1000)
        term.mak = mak
        declined = await term.redeem(card, 99999)
    assert good.rc == "00" and good.mac_ok is True
    assert tampered.rc == "A0" and tampered.envelope.processing_requirement == 3
    assert tampered.mac_ok is None, "an A0 answer cannot be MAC'd"
    assert missing.rc == "A0"
    assert declined.rc == "51" and declined.mac_ok is True
    assert await network.balance(card) == 10


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_flipping_any_bit_of_a_maced_request_never_posts(network_sync, data):
    """Every bit the MAC covers (MTI to field 64). The TPDU and header are
    addressing, outside the MAC by the protocol's definition."""

    async def run() -> None:
        card = network_sync.cards[0]
        async with network_sync.terminal(0) as term:
            fields = term.request("accrue", card, 5000)
            raw = bytearray(CUP.encode(fields, sign=lambda d: crypto.mac_cup_ecb(term.mak, d)))
            bit = data.draw(st.integers(min_value=11 * 8, max_value=len(raw) * 8 - 1))
            raw[bit // 8] ^= 1 << (bit % 8)
            before = await network_sync.balance(card)
            answer = await answer_or_none(term, BIN2.frame(bytes(raw)))
            # Give a request that was (wrongly) accepted time to post before looking.
            await term.echo()
            assert await network_sync.balance(card) == before, f"bit {bit} flipped and points moved"
            if answer is not None:
                assert answer.get("39") in {"A0", "30", "12", "40", "97", "03", "58"}, (bit, answer.get("39"))

    asyncio.run(run())


async def test_iso87_terminals_mac_with_x919_under_the_double_length_mak_of_their_sign_on(network):
    """iso87 authenticates by default: X9.19 under a 16-byte MAK issued by the key exchange."""
    async with network.terminal(0, "iso87") as term:
        assert term.mak is not None and len(term.mak) == 16
        good = await term.accrue(network.cards[0], 2000)
        term.mak = crypto.generate_key(16)
        bad = await term.accrue(network.cards[0], 2000)
    assert good.rc == "00" and good.mac_ok is True
    assert bad.rc == "A0" and "64" not in bad.fields
    assert await network.balance(network.cards[0]) == 20


# -- PIN -------------------------------------------------------------------------------
async def test_pin_right_wrong_lockout_and_unlock(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        await term.accrue(card, 100000)
        assert (await term.redeem(card, 100)).rc == "00"
        assert (await term.redeem(card, 100, pin="000000")).rc == "55"
        assert (await term.redeem(card, 100)).rc == "00", "a right PIN resets the count"
        assert (await term.inquiry(card, pin="000000")).rc == "55"
        assert (await term.redeem(card, 100, pin="111111")).rc == "55"
        third = await term.redeem(card, 100, pin="222222")
        locked_right = await term.inquiry(card)
        accrual = await term.accrue(card, 1000)
    assert third.rc == "75", "the third wrong PIN in a row locks the card for PIN use"
    assert locked_right.rc == "75", "locked until an operator unlocks it, even with the right PIN"
    assert accrual.rc == "00", "accrual needs no PIN"
    con = await network.db()
    try:
        shown = await admin.show_card(con, network.vault, card)
        assert shown["pin_locked"] is True and shown["pin_failures"] == 3
        await admin.unlock_pin(con, network.vault, card)
    finally:
        await con.close()
    async with network.terminal(0) as term:
        unlocked = await term.inquiry(card)
    assert unlocked.rc == "00"
    assert unlocked.points_balance == 1000 - 200 + 10


async def test_missing_pin_block_is_declined_55_without_counting_a_try(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        await term.accrue(card, 10000)
        for _ in range(4):
            reply = await term.send(term.request("redeem", card, 10, pin=""))
            assert reply.rc == "55"
        assert "52" not in reply.request
        ok = await term.redeem(card, 10)
    assert ok.rc == "00", "missing PIN blocks are not wrong tries"


async def test_set_pin_changes_the_pin(network):
    card = network.cards[1]
    con = await network.db()
    try:
        await admin.set_pin(con, network.vault, card, "8642")
    finally:
        await con.close()
    async with network.terminal(0) as term:
        old = await term.inquiry(card)
        new = await term.inquiry(card, pin="8642")
    assert (old.rc, new.rc) == ("55", "00")


# -- track 2 ---------------------------------------------------------------------------
async def test_track2_must_carry_the_card_number_clear_or_under_the_tdk(network):
    card = network.cards[0]
    other = network.cards[1]
    async with network.terminal(0) as term:
        ok = await term.send(term.request("accrue", card, 1000, track2=f"{card}D30121010000000000"))
        wrong = await term.send(term.request("accrue", card, 1000, track2=f"{other}D30121010000000000"))
        await term.sign_on("004")
        assert term.tdk is not None
        request = term.request("accrue", card, 1000, track2=f"{card}D30121010000000000")
        assert "30121010000000000" not in request["35"], "track data travels encrypted under 004 keys"
        encrypted = await term.send(request)
    assert ok.rc == "00"
    assert wrong.rc == "14"
    assert encrypted.rc == "00"
    assert await network.balance(card) == 20


# -- logs --------------------------------------------------------------------------------
async def test_the_demo_scenario_at_debug_level_logs_no_card_pin_block_key_or_track(switch):
    con = await admin_connection(switch)
    tmks: dict[str, bytes] = {}
    try:
        for mid, name, rate, tid in DEMO_MERCHANTS:
            await admin.add_merchant(con, mid, name, rate)
            tmks[tid] = bytes.fromhex((await admin.add_terminal(con, switch.vault, tid, mid))["tmk"])
        await admin.add_card(con, switch.vault, DEMO_CARD, "Li Lei", "13800000000", DEMO_PIN)
    finally:
        await con.close()
    captured = io.StringIO()
    logs.configure("debug", json=True, stream=captured)
    try:
        steps = await run_scenario("127.0.0.1", switch.ports["cup"], tmks, DEMO_CARD)
    finally:
        logs.configure("warning")
    text = captured.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(e.get("level") == "debug" and e.get("event") == "request" for e in lines), "debug lines captured"
    secrets = {DEMO_CARD, DEMO_PIN}
    secrets |= {t.hex() for t in tmks.values()} | {t.hex().upper() for t in tmks.values()}
    for step in steps:
        for f in ("52", "35", "62"):
            if f in step.reply.request:
                secrets.add(step.reply.request[f])
            if f in step.reply.fields:
                secrets.add(step.reply.fields[f])
    for secret in secrets:
        assert secret not in text, "a secret appears in the log"
    assert "628888*********0017" in text, "the card appears masked"
    assert not re.search(r"(?<![0-9])62888800000000000(17)?(?![0-9])", text)


async def admin_connection(switch):
    import asyncpg

    return await asyncpg.connect(switch.dsn)
