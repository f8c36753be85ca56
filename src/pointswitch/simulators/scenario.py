"""The demo scenario: one member, three merchants, every operation once.

Speaks only the wire. Each step states what it expects; the scenario fails
loudly when the network does not do what a member would expect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .terminal import Reply, TerminalClient

DEMO_CARD = "6288880000000000017"
DEMO_PIN = "246810"
DEMO_BANK_CARD = "6222020000000000018"  # the member's UnionPay card
DEMO_SLOW_BANK_CARD = "6222020000000000026"  # the bank simulator answers for this one too late
DEMO_POLICY = "2026000123456"
DEMO_MERCHANTS = [
    # merchant id, name, earn rate (points per yuan), terminal id
    ("M00000000000001", "Tea House", "1", "TA000001"),
    ("M00000000000002", "Book Store", "2", "TB000001"),
    ("M00000000000003", "Cinema", "1", "TC000001"),
]


async def _settle(term: TerminalClient, check: Callable[..., Reply]) -> None:
    """Closing time at one terminal: settle, upload, sign on into the next batch."""
    batch = term.batch
    settled = check(f"{term.terminal_id} settles batch {batch} with the totals of its own journal (0500)",
                    await term.settle())
    if settled.fields.get("48", "")[30:31] != "1":
        raise ScenarioFailed(f"{term.terminal_id}: the switch's totals of batch {batch} differ from the terminal's")
    replies = await term.upload()
    check(f"{term.terminal_id} uploads the batch's records ({len(replies) - 1} x 0320, then the end: 207)",
          replies[-1])
    check(f"{term.terminal_id} signs on: batch {batch} is closed, the switch opens the next", await term.sign_on())
    if term.batch == batch:
        raise ScenarioFailed(f"{term.terminal_id}: the batch did not advance after settlement")


@dataclass
class Step:
    title: str
    reply: Reply
    expected_rc: str
    expected_balance: int | None = None

    @property
    def ok(self) -> bool:
        if self.reply.rc != self.expected_rc:
            return False
        return self.expected_balance is None or self.reply.points_balance == self.expected_balance


class ScenarioFailed(AssertionError):
    pass


async def run_scenario(host: str, port: int, tmks: dict[str, bytes], card: str = DEMO_CARD,
                       report: Callable[[Step], None] = lambda step: None, pin: str = DEMO_PIN,
                       upstream: bool = False, end_of_day: bool = False) -> list[Step]:
    """Drive the demo network. ``tmks`` are the terminals' master keys (terminal id ->
    key), as loaded into each terminal when it was installed. ``end_of_day``: each
    terminal then settles its batch with its own totals (0500), uploads it (0320)
    and signs on into the next batch, as a POS does at closing time."""
    steps: list[Step] = []
    (ma, _, _, ta), (mb, _, _, tb), (mc, _, _, tc) = DEMO_MERCHANTS
    a = await TerminalClient(host, port, ta, ma, tmk=tmks[ta], default_pin=pin).connect()
    b = await TerminalClient(host, port, tb, mb, tmk=tmks[tb], default_pin=pin).connect()
    c = await TerminalClient(host, port, tc, mc, tmk=tmks[tc], default_pin=pin).connect()

    def check(title: str, reply: Reply, rc: str = "00", balance: int | None = None) -> Reply:
        step = Step(title, reply, rc, balance)
        steps.append(step)
        report(step)
        if not step.ok:
            raise ScenarioFailed(
                f"{title}: expected rc {rc} balance {balance}, got rc {reply.rc} balance {reply.points_balance}"
            )
        return reply

    try:
        for term in (a, b, c):
            check(f"sign on {term.terminal_id}: working keys under its master key, check values verified",
                  await term.sign_on())
        start = (await a.inquiry(card)).points_balance or 0
        check("balance inquiry at Tea House (PIN block under the PIK, MAC under the MAK)",
              await a.inquiry(card), balance=start)
        check("balance inquiry with a wrong PIN", await a.inquiry(card, pin="111111"), rc="55")
        check("buy tea for 100.00 yuan at Tea House (1 point per yuan)",
              await a.accrue(card, 10000), balance=start + 100)
        check("buy books for 58.50 yuan at Book Store (2 points per yuan): one balance, the sum",
              await b.accrue(card, 5850), balance=start + 217)
        check("pay a 1.20 yuan cinema ticket with points at Cinema",
              await c.redeem(card, 120), balance=start + 97)
        extra = check("buy tea for 30.00 yuan", await a.accrue(card, 3000), balance=start + 127)
        check("void that purchase (same batch)", await a.void(extra), balance=start + 97)
        books = check("buy books for 40.00 yuan", await b.accrue(card, 4000), balance=start + 177)
        check("return 10.00 yuan of the books: a quarter of 80 points clawed back",
              await b.refund(books, 1000), balance=start + 157)
        lost = a.request("accrue", card, 2000)
        check("buy tea for 20.00 yuan (the terminal will say it never got the answer)",
              await a.send(lost), balance=start + 177)
        check("terminal reverses it (0400, reason 98)", await a.reverse(lost), balance=start + 157)
        again = b.request("accrue", card, 500)
        first = check("buy a 5.00 yuan bookmark", await b.send(again), balance=start + 167)
        second = check("the terminal retransmits the same message", await b.send(again), balance=start + 167)
        if second.rrn != first.rrn:
            raise ScenarioFailed("the retransmission did not get the stored response")
        check("balance inquiry: the retransmission posted once", await c.inquiry(card), balance=start + 167)
        check("a purchase altered on the line after its MAC was computed: nothing posted",
              await c.accrue(card, 100000, tamper=True), rc="A0")
        check("the terminal signs on again as asked (new working keys)", await c.sign_on())
        check("balance unchanged", await c.inquiry(card), balance=start + 167)
        if upstream:  # points leaving the network (100 points a yuan)
            check("convert 100 points into 1.00 yuan on the member's UnionPay card (through the bank host)",
                  await c.cash_out(card, 100, DEMO_BANK_CARD), balance=start + 67)
            check("pay 0.50 yuan of an insurance premium with points (through the insurer host)",
                  await c.insurance(card, 50, DEMO_POLICY), balance=start + 17)
            check("cash out 0.10 yuan: the bank answers too late, 98, the points come back at once",
                  await c.cash_out(card, 10, DEMO_SLOW_BANK_CARD), rc="98")
            check("balance inquiry: nothing left the card", await c.inquiry(card), balance=start + 17)
        if end_of_day:
            for term in (a, b, c):
                await _settle(term, check)
    finally:
        for term in (a, b, c):
            await term.close()
    return steps
