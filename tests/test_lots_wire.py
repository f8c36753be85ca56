"""Lots end to end over TCP, on a switch of its own whose network lets points expire
(24 months): the next expiry in field 44 of an accrual's answer, and a reversed
redemption giving its points back to the lots they came from, with their expiry.
(A void after the points were spent: tests/test_operations.py.)"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import AsyncIterator

from pointswitch.app import running_switch
from pointswitch.config import ExpiryConfig, ListenerConfig
from pointswitch.ledger import admin

from .conftest import Network


@contextlib.asynccontextmanager
async def expiring_network(switch, network: Network) -> AsyncIterator[Network]:
    """``network``, reached through a switch whose points expire after 24 months."""
    cfg = dataclasses.replace(switch.config)
    cfg.listeners = [ListenerConfig("cup", 0, "cup", "binary2", host="127.0.0.1")]
    cfg.expiry = ExpiryConfig("months", months=24)
    async with running_switch(cfg, switch.dsn, switch.vault) as running:
        yield dataclasses.replace(network, ports={"cup": running.switch.bound["cup"][1]})


async def _lots(network: Network, card: str) -> list[tuple[datetime.date | None, int, int]]:
    con = await network.db()
    try:
        rows = await con.fetch("SELECT expires_on, points_earned, points_left FROM point_lots"
                               " WHERE card_index = $1 ORDER BY lot_id", network.card_index(card))
    finally:
        await con.close()
    return [(r[0], r[1], r[2]) for r in rows]


async def _expire_first_lot_on(network: Network, card: str, day: datetime.date) -> None:
    """Make the card's first lot an older one, expiring on ``day``."""
    con = await network.db()
    try:
        await con.execute("UPDATE point_lots SET expires_on = $2 WHERE lot_id = (SELECT min(lot_id) FROM point_lots"
                          " WHERE card_index = $1)", network.card_index(card), day)
    finally:
        await con.close()


async def test_accrual_answer_carries_the_next_expiry_in_field_44(switch, network):
    card = network.cards[0]
    async with expiring_network(switch, network) as net, net.terminal(0) as term:
        first = await term.accrue(card, 2000)  # 20 points, expiring in 24 months
        assert first.rc == "00"
        expires = (await _lots(net, card))[0][0]
        assert expires is not None
        assert first.fields["44"] == expires.strftime("%Y%m%d") + f"{20:012d}"
        soon = datetime.date.today() + datetime.timedelta(days=10)
        await _expire_first_lot_on(net, card, soon)
        second = await term.accrue(card, 5000)
        assert second.fields["44"] == soon.strftime("%Y%m%d") + f"{20:012d}", "the soonest expiry, not the newest"
    async with network.terminal(1) as term:  # the shared switch, a card with nothing expiring: no 44
        third = await term.accrue(network.cards[1], 100)
        assert third.rc == "00" and "44" not in third.fields


async def test_reversed_redemption_gives_points_back_with_their_original_expiry(switch, network):
    card = network.cards[0]
    soon = datetime.date.today() + datetime.timedelta(days=10)
    async with expiring_network(switch, network) as net, net.terminal(0) as term:
        await term.accrue(card, 2000)  # lot A: 20 points
        await _expire_first_lot_on(net, card, soon)
        await term.accrue(card, 5000)  # lot B: 50 points, 24 months
        later = (await _lots(net, card))[1][0]
        redemption = await term.redeem(card, 30)  # 30 points: A's 20 first (sooner), then 10 of B
        assert redemption.rc == "00"
        assert [lot[2] for lot in await _lots(net, card)] == [0, 40]
        reversal = await term.reverse(redemption.request)
        assert reversal.rc == "00"
    assert await _lots(net, card) == [(soon, 20, 20), (later, 50, 50)]
    con = await network.db()
    try:
        shown = await admin.show_card(con, network.vault, card, 0)
    finally:
        await con.close()
    assert shown["points_by_expiry"] == {"expiring": {soon.isoformat(): 20, later.isoformat(): 50},
                                         "never_expiring": 0}


def test_expiry_setting_and_dates(tmp_path):
    from pointswitch.config import ConfigError, load
    from pointswitch.ledger import ExpiryRule
    from pointswitch.ledger.lots import expiry_date

    assert load(env={}).expiry.policy == "never", "a new network's points never expire"
    path = tmp_path / "c.toml"
    path.write_text('[expiry]\npolicy = "end_of_year"\nyears = 2\n')
    assert (load(path, env={}).expiry.policy, load(path, env={}).expiry.years) == ("end_of_year", 2)
    path.write_text('[expiry]\npolicy = "sometimes"\n')
    try:
        load(path, env={})
    except ConfigError as exc:
        assert "policy" in str(exc)
    else:
        raise AssertionError("an unknown policy is refused")
    day = datetime.date
    assert expiry_date(ExpiryRule("never"), day(2025, 3, 15)) is None
    assert expiry_date(ExpiryRule("months", months=24), day(2025, 3, 15)) == day(2027, 3, 14)
    assert expiry_date(ExpiryRule("months", months=1), day(2025, 1, 31)) == day(2025, 2, 27)
    assert expiry_date(ExpiryRule("end_of_year", years=1), day(2025, 6, 1)) == day(2026, 12, 31)
