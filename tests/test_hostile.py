"""Hostile peers: what someone who can reach a port and knows a terminal id and a
merchant id (both printed on every receipt) can do. Each test performs an attack
over TCP against a switch with the production limits and shows that it fails,
and, where it applies, that the real terminal keeps working meanwhile.

The attacker connects from its own loopback address (127.0.0.2 ...), so that the
per-peer limits apply to it and not to the real terminal on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import socket
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointswitch.app import Running, running_switch
from pointswitch.codecs import crypto
from pointswitch.config import ConfigError, ListenerConfig, load
from pointswitch.ledger import admin
from pointswitch.ledger.pins import pin_verifier
from pointswitch.simulators.terminal import TerminalClient, TerminalError
from pointswitch.switch import metrics

from .conftest import Network, SwitchUnderTest, _test_config

ATTACKER = "127.0.0.2"
_addresses = itertools.count(10)


def attacker_address() -> str:
    """A loopback address of its own for each attacker (bans do not leak between tests)."""
    return f"127.0.0.{next(_addresses) % 250 + 3}"


@contextlib.asynccontextmanager
async def guarded_switch(sut: SwitchUnderTest, dsn: str | None = None, **overrides: object
                         ) -> AsyncIterator[Running]:
    """The switch with the production security limits (not the lifted ones of the shared
    test switch); ``dsn``: reach the database another way (through a proxy, say)."""
    cfg = _test_config()
    cfg.database.data_dir = str(sut.data_dir)
    cfg.limits = dataclasses.replace(cfg.limits, max_connections_per_peer=64, unauthenticated_idle_timeout_s=15)
    cfg.security = dataclasses.replace(type(cfg.security)(), **{k: v for k, v in overrides.items()
                                                              if hasattr(cfg.security, k)})
    cfg.limits = dataclasses.replace(cfg.limits, **{k: v for k, v in overrides.items() if hasattr(cfg.limits, k)})
    cfg.database = dataclasses.replace(cfg.database, **{k: v for k, v in overrides.items()
                                                        if hasattr(cfg.database, k)})
    async with running_switch(cfg, dsn or sut.dsn, sut.vault) as running:
        yield running


def on(running: Running, term: TerminalClient, dialect: str = "cup") -> TerminalClient:
    term.port = running.address(dialect)[1]
    return term


def attacker(net: Network, running: Running, n: int = 0, dialect: str = "cup", *,
             address: str | None = None) -> TerminalClient:
    """A client that knows the terminal id and merchant id, and no key."""
    term = on(running, net.terminal(n, dialect, sign_on=False, local_host=address or attacker_address()), dialect)
    term.tmk = None
    term.default_pin = None
    return term


async def approved_postings(net: Network, card: str) -> int:
    con = await net.db()
    try:
        return int(await con.fetchval(
            "SELECT count(*) FROM requests WHERE card_index = $1 AND state = 'approved'", net.card_index(card)))
    finally:
        await con.close()


async def closed_by_switch(term: TerminalClient, within_s: float = 3.0) -> bool:
    for _ in range(int(within_s * 20)):
        if term.closed_by_peer:
            return True
        await asyncio.sleep(0.05)
    return term.closed_by_peer


# -- 1. iso87 is no longer open ------------------------------------------------------------
def test_an_unauthenticated_listener_needs_loopback_and_an_explicit_setting(tmp_path):
    def config(text: str) -> None:
        path = tmp_path / "c.toml"
        path.write_text(text)
        load(path, env={})

    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        config('[[listener]]\nname = "a"\nport = 1\ndialect = "iso87"\nhost = "127.0.0.1"\nmac = "off"\n')
    with pytest.raises(ConfigError, match="loopback"):
        config('[[listener]]\nname = "a"\nport = 1\ndialect = "iso87"\nmac = "off"\nallow_unauthenticated = true\n')
    with pytest.raises(ConfigError, match="no longer a setting"):
        config('[[listener]]\nname = "a"\nport = 1\ndialect = "iso87"\nmac_key_file = "/k"\n')
    config('[[listener]]\nname = "a"\nport = 1\ndialect = "iso87"\nhost = "127.0.0.1"\nmac = "off"\n'
           'allow_unauthenticated = true\n')
    assert ListenerConfig("x", 1, "iso87").mac_method == "x919", "iso87 authenticates by default"


async def test_without_the_terminals_keys_nothing_posts_nothing_locks_nothing_reads(switch, network, dialect):
    """Accrue (mint), redeem, reverse someone's accrual, garbage PIN blocks, balance
    reads and reversal placeholders for future traces: all A0, nothing changed."""
    card = network.cards[0]
    async with guarded_switch(switch, max_mac_failures_per_peer=1000) as running:
        async with on(running, network.terminal(0, dialect), dialect) as real:
            earned = await real.accrue(card, 10000)
        async with attacker(network, running, 0, dialect) as evil:
            evil.batch = 1
            evil.trace = 500
            replies = [await evil.accrue(card, 99_999_900)]
            evil.mak = crypto.generate_key(16 if dialect == "iso87" else 8)  # a guessed key
            replies.append(await evil.accrue(card, 99_999_900))
            replies.append(await evil.reverse(earned.request))
            evil.pik = crypto.generate_key(16)
            for _ in range(5):  # garbage PIN blocks: would lock the card after 3
                replies.append(await evil.inquiry(card, pin="000000"))
            for trace in range(900, 905):  # placeholders for the real terminal's future traces
                future = dict(earned.request, **{"11": f"{trace:06d}"})
                replies.append(await evil.reverse(future))
        async with on(running, network.terminal(0, dialect), dialect) as real:
            real.trace = 899
            after = [await real.accrue(card, 100) for _ in range(6)]  # traces 900..905
            inquiry = await real.inquiry(card)
    assert {r.rc for r in replies} == {"A0"}
    assert all("54" not in r.fields and "64" not in r.fields for r in replies), "no balance, no MAC to study"
    assert [r.rc for r in after] == ["00"] * 6, "no trace of the real terminal was taken"
    assert inquiry.rc == "00" and inquiry.points_balance == 106
    con = await network.db()
    try:
        failures = await con.fetchval("SELECT pin_failures FROM cards WHERE card_index = $1", network.card_index(card))
    finally:
        await con.close()
    assert failures == 0


async def test_a_terminal_transacts_only_on_a_listener_of_its_profile(switch, network):
    """A cup terminal's id on the iso87 listener (or the other way round) is refused 58,
    for sign-on too: no keys are issued there."""
    async with guarded_switch(switch) as running:
        cup_on_iso = on(running, network.terminal(0, "cup", sign_on=False), "iso87")
        cup_on_iso.dialect_name, cup_on_iso.framing_name = "iso87", "ascii4"
        cup_on_iso.__post_init__()
        async with cup_on_iso:
            refused = await cup_on_iso.sign_on()
        iso_on_cup = on(running, network.terminal(0, "iso87", sign_on=False), "cup")
        iso_on_cup.dialect_name, iso_on_cup.framing_name = "cup", "binary2"
        iso_on_cup.__post_init__()
        async with iso_on_cup:
            refused_too = await iso_on_cup.sign_on()
    assert (refused.rc, refused_too.rc) == ("58", "58")
    assert "62" not in refused.fields and "62" not in refused_too.fields


# -- 2. sign-on and sign-off cannot be used against a terminal ----------------------------
async def test_a_strangers_sign_on_and_sign_off_do_not_stop_the_real_terminal(switch, network):
    card = network.cards[0]
    async with guarded_switch(switch) as running:
        async with on(running, network.terminal(0), "cup") as real:
            first = await real.accrue(card, 1000)
            async with attacker(network, running) as evil:
                stolen = await evil.sign_on()  # new keys, wrapped under a TMK it does not have
                wiped = await evil.sign_off(mac=False)
                wiped_with_garbage = await evil.sign_off(mac=False)
            second = await real.accrue(card, 1000)
            again = await real.sign_on()  # the real terminal's own sign-on still works
            third = await real.accrue(card, 1000)
    assert stolen.rc == "00" and "62" in stolen.fields, "UnionPay terminals send an unMAC'd sign-on"
    assert (wiped.rc, wiped_with_garbage.rc) == ("00", "00")
    assert [r.rc for r in (first, second, again, third)] == ["00"] * 4
    assert await network.balance(card) == 30


async def test_pending_keys_are_kept_per_peer_so_an_interleaved_stranger_cannot_displace_them(switch, network):
    card = network.cards[0]
    async with guarded_switch(switch) as running:
        real = on(running, network.terminal(0, sign_on=False), "cup")
        async with real, attacker(network, running) as evil:
            await evil.sign_on()
            assert (await real.sign_on()).rc == "00"
            for _ in range(3):  # signs on between the real sign-on and its first use
                await evil.sign_on()
            reply = await real.accrue(card, 500)
    assert reply.rc == "00" and reply.mac_ok is True


async def test_sign_off_with_a_valid_mac_withdraws_the_keys(switch, network):
    card = network.cards[0]
    async with guarded_switch(switch) as running:
        async with on(running, network.terminal(0), "cup") as real:
            assert (await real.accrue(card, 100)).rc == "00"
            assert (await real.sign_off(mac=True)).rc == "00"
            after = await real.accrue(card, 100)
    assert after.rc == "A0"


async def test_single_length_keys_only_where_the_profile_allows_them(switch, network):
    async with guarded_switch(switch) as running:
        async with on(running, network.terminal(0, sign_on=False), "cup") as term:
            refused = await term.sign_on("001")
            con = await network.db()
            try:
                await admin.set_terminal_profile(con, network.terminal_ids[0], single_des_allowed=True)
            finally:
                await con.close()
            allowed = await term.sign_on("001")
    assert (refused.rc, allowed.rc) == ("58", "00")


async def test_sign_ons_are_rate_limited_per_terminal_and_peer(switch, network):
    async with guarded_switch(switch, sign_ons_per_minute=3) as running:
        async with attacker(network, running) as evil:
            codes = [(await evil.sign_on()).rc for _ in range(5)]
        async with on(running, network.terminal(0, sign_on=False), "cup") as real:
            own = await real.sign_on()
    assert codes == ["00", "00", "00", "65", "65"]
    assert own.rc == "00", "the limit is per terminal and peer: the real terminal is not affected"


async def test_an_online_mac_search_gets_the_peer_refused(switch, network):
    card = network.cards[0]
    banned_before = metrics.PEERS_BANNED._value.get()
    address = attacker_address()
    async with guarded_switch(switch, max_mac_failures_per_peer=5) as running:
        async with attacker(network, running, address=address) as evil:
            evil.mak = crypto.generate_key(8)
            codes = []
            for _ in range(6):
                try:
                    codes.append((await evil.accrue(card, 100)).rc)
                except TerminalError:
                    codes.append("closed")
                    break
            cut_off = await closed_by_switch(evil)
        again = attacker(network, running, address=address)
        async with again:
            refused = await closed_by_switch(again)
        async with on(running, network.terminal(0), "cup") as real:
            served = await real.accrue(card, 100)
    assert codes[:4] == ["A0"] * 4 and codes[-1] == "closed", "the fifth failure cuts it off"
    assert cut_off and refused, "the peer's connections are closed and new ones refused"
    assert metrics.PEERS_BANNED._value.get() == banned_before + 1
    assert served.rc == "00"


async def test_mac_failures_from_many_peers_withdraw_the_keys_and_one_sign_on_restores_service(switch, network):
    card = network.cards[0]
    async with guarded_switch(switch, max_mac_failures_per_peer=3, max_mac_failures_per_terminal=6) as running:
        async with on(running, network.terminal(0), "cup") as real:
            assert (await real.accrue(card, 100)).rc == "00"
            for _ in range(3):  # three peers, two forged MACs each
                async with attacker(network, running) as evil:
                    evil.mak = crypto.generate_key(8)
                    for _ in range(2):
                        await evil.accrue(card, 100)
            dropped = await real.accrue(card, 100)
            await real.sign_on()
            restored = await real.accrue(card, 100)
    assert dropped.rc == "A0", "the keys under attack are withdrawn"
    assert restored.rc == "00", "one sign-on restores service"
    assert await network.balance(card) == 2


async def test_a_forged_mac_is_refused_from_memory(switch, network):
    """After the terminal's session is cached, forged frames cost no database read
    (one re-read a second at most, in case another process changed the keys)."""
    card = network.cards[0]
    async with guarded_switch(switch, max_mac_failures_per_peer=1000, max_mac_failures_per_terminal=1000) as running:
        async with on(running, network.terminal(0), "cup") as real:
            assert (await real.accrue(card, 100)).rc == "00"
        sessions = running.ledger.sessions
        misses = sessions.misses
        async with attacker(network, running) as evil:
            evil.mak = crypto.generate_key(8)
            codes = {(await evil.accrue(card, 100)).rc for _ in range(50)}
        assert codes == {"A0"}
        assert sessions.misses - misses <= 2


# -- 4. limits a hostile peer cannot exhaust ---------------------------------------------------
async def test_connections_per_peer_are_capped(switch, network):
    async with guarded_switch(switch, max_connections_per_peer=4) as running:
        address = attacker_address()
        clients = [attacker(network, running, address=address) for _ in range(5)]
        for c in clients:
            await c.connect()
        try:
            assert await closed_by_switch(clients[-1])
            assert not any(c.closed_by_peer for c in clients[:4])
            async with on(running, network.terminal(0), "cup") as real:
                assert (await real.echo()).rc == "00", "other peers are served"
        finally:
            for c in clients:
                await c.close()


async def test_a_connection_that_never_authenticates_gets_the_short_idle_timeout(switch, network):
    async with guarded_switch(switch, unauthenticated_idle_timeout_s=0.5) as running:
        idle = attacker(network, running)
        async with idle, on(running, network.terminal(0), "cup") as real:
            assert (await idle.sign_on()).rc == "00"
            assert (await real.accrue(network.cards[0], 100)).rc == "00"  # authenticated
            assert await closed_by_switch(idle, within_s=3)
            assert not real.closed_by_peer


async def test_past_the_global_in_flight_cap_requests_are_refused_at_once_and_post_nothing(switch, network):
    card = network.cards[0]
    async with guarded_switch(switch, max_requests_in_flight=2) as running:
        terms = [on(running, network.terminal(0, sign_on=i == 0), "cup") for i in range(4)]
        for i, t in enumerate(terms):
            await t.connect()
            t.trace = i * 100
            t.pik, t.mak = terms[0].pik, terms[0].mak  # one terminal, one session, several connections
        try:
            for t in terms:
                t.timeout_s = 2.0
            sends = [t.accrue(card, 100) for t in terms for _ in range(8)]
            inquiries = [terms[0].inquiry(card) for _ in range(8)]
            replies = await asyncio.gather(*sends, return_exceptions=True)
            inquired = await asyncio.gather(*inquiries, return_exceptions=True)
        finally:
            for t in terms:
                await t.close()
    rcs = [r.rc if not isinstance(r, BaseException) else "none" for r in replies]
    assert set(rcs) <= {"00", "none"} and "none" in rcs, "past the cap: no answer for a request with a key"
    assert await network.balance(card) == rcs.count("00"), "what got no answer posted nothing"
    assert {r.rc for r in inquired if not isinstance(r, BaseException)} <= {"00", "96"}


async def test_a_peer_that_does_not_read_its_answers_stops_being_read(switch, network):
    async with guarded_switch(switch, max_write_buffer_bytes=2048) as running:
        async with on(running, network.terminal(0), "cup") as slow:
            slow._reader_task.cancel()  # stops reading its answers
            slow._writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            port = slow._writer.get_extra_info("sockname")[1]
            (conn,) = [c for c in running.switch.connections if c.peer == f"127.0.0.1:{port}"]
            conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            echo = slow.base_fields("0820", "", "00", network_code="301")
            del echo["3"], echo["25"]
            frame = slow.framing.frame(slow.dialect.encode(echo))
            for _ in range(100):
                slow._writer.write(frame * 500)
                await asyncio.sleep(0.01)
                if conn.writing_paused:
                    break
            assert conn.writing_paused and conn.paused, "the switch stopped reading from it"
            assert conn.transport.get_write_buffer_size() < 2048 + 64 * 1024, "what it buffers is bounded"
            async with on(running, network.terminal(1), "cup") as other:
                assert (await other.echo()).rc == "00", "everyone else is served"


# -- 7. no balance without authentication --------------------------------------------------------
async def test_reversal_of_an_unseen_or_mismatched_original_reveals_no_balance(switch, network):
    card, other_card = network.cards[0], network.cards[1]
    async with guarded_switch(switch) as running, on(running, network.terminal(0), "cup") as term:
        earned = await term.accrue(card, 5000)
        mismatched = await term.reverse(dict(earned.request, **{"2": other_card}))
        unseen = await term.reverse(dict(earned.request, **{"11": "777777", "2": other_card}))
        declined = await term.redeem(card, 10_000_000)
    assert mismatched.rc == "25" and mismatched.points_balance is None
    assert unseen.rc == "00" and unseen.points_balance is None
    assert declined.rc == "51" and declined.points_balance is None
    assert earned.points_balance == 50



# -- interleavings: a real terminal and an attacker ---------------------------------------------
_example_traces = itertools.count(1)

ACTIONS = st.sampled_from(["real_accrue", "real_accrue", "real_sign_on", "real_sign_off",
                           "evil_sign_on", "evil_sign_off", "evil_forged", "evil_forged_reversal",
                           "evil_forged_sign_off"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(ACTIONS, min_size=1, max_size=12))
def test_interleavings_never_post_a_forgery_nor_stop_the_real_terminal_past_one_sign_on(switch, network_sync,
                                                                                         actions):
    net: Network = network_sync
    card = net.cards[2]

    async def run() -> None:
        start = await net.balance(card)
        approved = 0
        forged = 0  # forged financial messages since the terminal's keys were last withdrawn
        withdrawn = False  # the per-terminal limit withdrew the keys since the real terminal's sign-on
        async with guarded_switch(switch, max_mac_failures_per_peer=3, max_mac_failures_per_terminal=4,
                                  sign_ons_per_minute=1000) as running:
            real = on(running, net.terminal(1, sign_on=False), "cup")
            real.trace = next(_example_traces) * 40 % 999_000
            async with real:
                assert (await real.sign_on()).rc == "00"
                last_real = None
                for action in actions:
                    if action == "real_sign_on":
                        assert (await real.sign_on()).rc == "00"
                        withdrawn = False
                    elif action == "real_sign_off":
                        assert (await real.sign_off(mac=True)).rc == "00"
                        real.mak = None  # it knows it signed off: it signs on before its next request
                    elif action == "real_accrue":
                        if real.mak is None:
                            assert (await real.sign_on()).rc == "00"
                            withdrawn = False
                        reply = await real.accrue(card, 100)
                        if reply.rc == "A0":
                            assert withdrawn, "only a withdrawal by the MAC-failure limit may cost a sign-on"
                            assert (await real.sign_on()).rc == "00"  # one sign-on restores service
                            withdrawn = False
                            reply = await real.accrue(card, 100)
                        assert reply.rc == "00", reply.rc
                        approved += 1
                        last_real = reply
                    else:
                        async with attacker(net, running, 1) as evil:
                            evil.trace = real.trace + 20
                            try:
                                if action == "evil_sign_on":
                                    await evil.sign_on()
                                elif action == "evil_sign_off":
                                    await evil.sign_off(mac=False)
                                elif action == "evil_forged_sign_off":
                                    evil.mak = crypto.generate_key(8)
                                    await evil.sign_off(mac=True)
                                elif action == "evil_forged" or (action == "evil_forged_reversal" and last_real):
                                    evil.mak = crypto.generate_key(8)
                                    reply = await (evil.accrue(card, 1_000_000) if action == "evil_forged"
                                                   else evil.reverse(last_real.request))  # type: ignore[union-attr]
                                    assert reply.rc == "A0"
                                    forged += 1
                                    if forged == 4:
                                        forged, withdrawn = 0, True
                            except TerminalError:
                                pass  # cut off by the switch: what it deserves
        assert await net.balance(card) == start + approved, "exactly the real terminal's accruals posted"

    asyncio.run(run())


# -- 5. PINs --------------------------------------------------------------------------------------
async def _pin_state(net: Network, card: str) -> tuple[int, int, bool, str]:
    con = await net.db()
    try:
        row = await con.fetchrow("SELECT pin_failures, pin_checks_pending, pin_locked, pin_hash FROM cards"
                                 " WHERE card_index = $1", net.card_index(card))
    finally:
        await con.close()
    return row["pin_failures"], row["pin_checks_pending"], row["pin_locked"], row["pin_hash"]


async def _connections(net: Network, n: int) -> list[TerminalClient]:
    """n connections of one terminal sharing one session (as a terminal pool would)."""
    terms = [net.terminal(0, sign_on=i == 0) for i in range(n)]
    for i, t in enumerate(terms):
        await t.connect()
        t.trace = 1000 + i * 50
        t.pik, t.mak = terms[0].pik, terms[0].mak
    return terms


async def _redeem_in_parallel(net: Network, card: str, pins: list[str | None]) -> list[str]:
    """One redemption per PIN, all at once, on connections of one terminal; their codes."""
    async with net.terminal(0) as term:
        assert (await term.accrue(card, 100_000)).rc == "00"
    terms = await _connections(net, len(pins))
    try:
        replies = await asyncio.gather(*(t.redeem(card, 100, pin=pin) for t, pin in zip(terms, pins, strict=True)))
    finally:
        for t in terms:
            await t.close()
    return [r.rc for r in replies]


async def test_parallel_wrong_pins_cannot_get_more_tries_than_the_limit(network):
    card = network.cards[0]
    rcs = await _redeem_in_parallel(network, card, [f"{i:06d}" for i in range(1, 13)])
    failures, pending, locked, _ = await _pin_state(network, card)
    assert rcs.count("55") <= 2 and rcs.count("00") == 0, rcs
    assert (failures, pending, locked) == (3, 0, True), "exactly max_pin_tries were tried, then locked"


async def test_parallel_right_pins_all_pass(network):
    card = network.cards[0]
    assert await _redeem_in_parallel(network, card, [None] * 10) == ["00"] * 10
    assert (await _pin_state(network, card))[:3] == (0, 0, False)


async def test_a_retransmitted_wrong_pin_counts_one_try(network):
    card = network.cards[0]
    async with network.terminal(0) as term:
        await term.accrue(card, 10_000)
        wrong = term.request("redeem", card, 100, pin="999999")
        first, again = await term.send(wrong), await term.send(wrong)
    assert (first.rc, again.rc) == ("55", "55")
    assert (await _pin_state(network, card))[0] == 1


async def test_pins_are_keyed_verification_values_and_12_digit_cards_work(switch, network):
    card = "628881234567"  # 12 digits
    con = await network.db()
    try:
        await admin.add_card(con, switch.vault, card, "Short Number", pin="2468")
    finally:
        await con.close()
    async with network.terminal(0) as term:
        await term.accrue(card, 5000)
        paid = await term.redeem(card, 10, pin="2468")
        wrong = await term.redeem(card, 10, pin="1357")
    _, _, _, stored = await _pin_state(network, card)
    assert (paid.rc, wrong.rc) == ("00", "55")
    assert stored.startswith("pvv1$") and "2468" not in stored
    pvk = switch.vault.data_key("pvk")
    assert stored == pin_verifier(pvk, card, "2468"), "HMAC under the vault's PIN verification key"
    assert stored != pin_verifier(bytes(32), card, "2468"), "without the key it cannot be computed"
