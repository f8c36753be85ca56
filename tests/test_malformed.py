"""Bad input gets a clear answer and loses nothing; only broken framing closes a
connection; the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointswitch.app import running_switch
from pointswitch.codecs import dialect as get_dialect
from pointswitch.codecs import framing
from pointswitch.config import ListenerConfig
from pointswitch.simulators.terminal import TerminalClient

from .conftest import answer_or_none

CUP = get_dialect("cup")
BIN2 = framing("binary2")


async def _closed(client: TerminalClient, within_s: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        if client.closed_by_peer:
            return True
        await asyncio.sleep(0.02)
    return False


async def _still_serves(network, dialect_name: str = "cup") -> None:
    async with network.terminal(1, dialect_name) as other:
        reply = await other.inquiry(network.cards[2])
    assert reply.rc == "00", "another connection must still be served"


def _cup_frame(fields: dict[str, str]) -> bytes:
    return BIN2.frame(CUP.encode(fields))


async def test_bad_bcd_in_a_numeric_field_gets_30_and_the_connection_stays_open(network):
    async with network.terminal(0) as term:
        fields = term.request("accrue", network.cards[0], 1234)
        raw = bytearray(CUP.encode(fields))
        # Field 4 (n12, 6 BCD bytes) holds 000000001234: turn its last byte into 0x3A (nibble A).
        pos = raw.index(bytes.fromhex("001234"))
        raw[pos + 2] = 0x3A
        await term.send_raw(BIN2.frame(bytes(raw)))
        answer = await term.next_unmatched()
        follow_up = await term.accrue(network.cards[0], 100)
    assert answer["t"] == "0210"
    assert answer["39"] == "30"
    assert answer["11"] == fields["11"]
    assert follow_up.rc == "00"
    assert await network.balance(network.cards[0]) == 1


async def test_unknown_mti_is_answered_12_and_response_mtis_are_not_answered(network):
    async with network.terminal(0) as term:
        fields = term.base_fields("0300", "000000", "00")
        await term.send_raw(_cup_frame(fields))
        answer = await term.next_unmatched()
        stray_response = dict(term.base_fields("0210", "000000", "22"), **{"39": "00"})
        await term.send_raw(_cup_frame(stray_response))
        with pytest.raises(TimeoutError):
            await term.next_unmatched(timeout_s=0.5)
        still = await term.echo()
    assert (answer["t"], answer["39"]) == ("0310", "12")
    assert still.rc == "00"


async def test_secondary_bitmap_in_cup_is_a_format_error(network):
    async with network.terminal(0) as term:
        fields = term.request("accrue", network.cards[0], 100)
        raw = bytearray(CUP.encode(fields))
        raw[13] |= 0x80  # bitmap starts after TPDU(5) + header(6) + MTI(2)
        await term.send_raw(BIN2.frame(bytes(raw)))
        answer = await term.next_unmatched()
    assert answer["t"] == "0210"
    assert answer["39"] == "30"


async def test_oversized_length_closes_only_that_connection(network):
    async with network.terminal(0) as term:
        await term.send_raw((60000).to_bytes(2, "big") + b"\x60" * 10)
        assert await _closed(term)
    await _still_serves(network)


async def test_zero_length_frame_closes_the_connection(network):
    async with network.terminal(0) as term:
        await term.send_raw(b"\x00\x00")
        assert await _closed(term)
    await _still_serves(network)


async def test_non_digit_ascii_length_closes_the_connection(network):
    async with network.terminal(0, "iso87") as term:
        await term.send_raw(b"00X1" + b"0800")
        assert await _closed(term)
    await _still_serves(network, "iso87")


async def test_truncated_frame_is_dropped_after_the_frame_timeout(network):
    async with network.terminal(0) as term:
        await term.send_raw((100).to_bytes(2, "big") + b"\x60" * 50)
        await _still_serves(network)  # meanwhile, others are served
        assert await _closed(term, within_s=10), "an incomplete frame must not hold a connection forever"


async def test_frame_shorter_than_its_envelope_is_not_answered_but_tolerated(network):
    async with network.terminal(0) as term:
        await term.send_raw(BIN2.frame(b"\x60\x00"))
        with pytest.raises(TimeoutError):
            await term.next_unmatched(timeout_s=0.5)
        reply = await term.echo()
    assert reply.rc == "00"


async def test_a_stream_of_unanswerable_frames_closes_the_connection(network, switch):
    async with network.terminal(0) as term:
        for _ in range(switch.config.limits.max_undecodable_frames):
            await term.send_raw(BIN2.frame(b"\xff" * 20))
        assert await _closed(term)
    await _still_serves(network)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(min_size=1, max_size=300))
def test_random_bytes_never_take_the_server_down(network_sync, payload):
    async def run() -> None:
        async with network_sync.terminal(0) as term:
            answer = await answer_or_none(term, BIN2.frame(payload), timeout_s=0.25)
            if answer is not None:
                assert answer.get("39") in ("30", "12", "40", "97"), answer
        await _still_serves(network_sync)

    asyncio.run(run())


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_corrupted_requests_are_answered_or_dropped_and_post_nothing_unexpected(network_sync, data):
    async def run() -> None:
        card = network_sync.cards[0]
        async with network_sync.terminal(0) as term:
            fields = term.request("accrue", card, 100)
            raw = bytearray(CUP.encode(fields))
            pos = data.draw(st.integers(min_value=11, max_value=len(raw) - 1))
            raw[pos] = data.draw(st.integers(0, 255))
            before = await network_sync.balance(card)
            answer = await answer_or_none(term, BIN2.frame(bytes(raw)))
            after = await network_sync.balance(card)
            if answer is None or answer.get("39") != "00":
                assert after == before, "a request that was not approved moved points"
            else:
                assert after >= before
        await _still_serves(network_sync)

    asyncio.run(run())


async def test_pipelined_requests_beyond_the_in_flight_limit_are_all_answered(network, switch):
    limit = switch.config.limits.max_in_flight_per_connection
    async with network.terminal(0) as term:
        replies = await asyncio.gather(*(term.accrue(network.cards[0], 100) for _ in range(limit * 3)))
    assert [r.rc for r in replies] == ["00"] * (limit * 3)
    assert await network.balance(network.cards[0]) == limit * 3


async def test_connection_limit_and_idle_timeout(switch, network):
    cfg = dataclasses.replace(switch.config)
    cfg.listeners = [ListenerConfig("cup", 0, "cup", "binary2", host="127.0.0.1")]
    cfg.limits = dataclasses.replace(switch.config.limits, max_connections=2, idle_timeout_s=0.5)
    async with running_switch(cfg, switch.dsn, switch.vault) as running:
        port = running.switch.bound["cup"][1]
        clients = [TerminalClient("127.0.0.1", port, network.terminal_ids[0], network.merchant_id)
                   for _ in range(3)]
        for c in clients:
            await c.connect()
        assert await _closed(clients[2], within_s=2), "the third connection is refused"
        assert (await clients[0].echo()).rc == "00"
        assert await _closed(clients[0], within_s=3), "an idle connection is closed"
        for c in clients:
            await c.close()
