"""Faults: what a terminal is told, and what the switch keeps doing, when
connections, the database or processes misbehave. Each test is the regression
test of a defect found by the fault campaign."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from pointswitch import logs
from pointswitch.simulators.terminal import TerminalError

from .conftest import Network, SwitchUnderTest
from .test_hostile import guarded_switch, on


async def test_a_busy_pipelining_client_is_not_cut_off_by_the_frame_timer(switch: SwitchUnderTest, network: Network):
    """The frame timer measures one frame, from its first byte to its last: a client
    whose reads keep ending mid-frame because it never stops sending is not closed."""
    async with guarded_switch(switch, frame_timeout_s=0.5, unauthenticated_idle_timeout_s=30) as running:
        async with on(running, network.terminal(0), "cup") as term:
            echo = term.base_fields("0820", "", "00", network_code="301")
            del echo["3"], echo["25"]
            frames = []
            for trace in range(1, 200):
                echo["11"] = f"{trace:06d}"
                frames.append(term.framing.frame(term.dialect.encode(echo)))
            stream = b"".join(frames)
            step = len(frames[0]) * 3 // 2  # every write ends in the middle of a frame
            for at in range(0, len(stream), step):
                term._writer.write(stream[at:at + step])
                await asyncio.sleep(0.01)  # ~1.3 s of continuous traffic, frame timeout 0.5 s
            answers = []
            for _ in range(len(frames)):
                answers.append(await term.next_unmatched(timeout_s=2))
            assert not term.closed_by_peer
    assert len(answers) == len(frames) and {a["39"] for a in answers} == {"00"}


# -- an answer never lies -------------------------------------------------------------------------
async def _locked(dsn: str, sql: str, *args: object) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """Another session holding row locks (a stalled database, as far as those rows go)."""
    con = await asyncpg.connect(dsn)
    tx = con.transaction()
    await tx.start()
    await con.execute(sql, *args)
    return con, tx


async def _count(dsn: str, sql: str, *args: object) -> int:
    con = await asyncpg.connect(dsn)
    try:
        return int(await con.fetchval(sql, *args))
    finally:
        await con.close()


async def test_a_deadline_before_commit_answers_96_and_nothing_is_ever_posted(switch, network):
    """The card's row is locked elsewhere: the accrual's transaction is open, its COMMIT
    not sent, when the deadline passes. Answer 96; its database connection is cut, so
    when the lock goes the transaction cannot commit after all."""
    card = network.cards[0]
    async with (guarded_switch(switch, request_timeout_s=1.0) as running,
                on(running, network.terminal(0), "cup") as term):
        blocker, tx = await _locked(switch.dsn, "SELECT 1 FROM cards WHERE card_index = $1 FOR UPDATE",
                                    network.card_index(card))
        try:
            started = time.monotonic()
            reply = await term.accrue(card, 5000)
            waited_s = time.monotonic() - started
        finally:
            await tx.rollback()
            await blocker.close()
        await asyncio.sleep(0.5)
        retried = await term.send(reply.request | {"11": reply.request["11"]})  # the same request again
    assert reply.rc == "96" and waited_s < 3, "the deadline is kept"
    assert retried.rc == "00", "the retransmission is processed now, once"
    assert await network.balance(card) == 50


async def test_a_retransmission_of_a_committed_accrual_in_a_stalled_batch_is_never_answered_96(switch, network):
    """Found by the fault campaign (seed 767972841: an accrual answered 00, its
    retransmission 96). A retransmission shares its group-commit batch with a new
    accrual whose card is locked elsewhere; the deadline passes before the batch can
    commit. The new accrual is answered 96 (nothing of it commits); the
    retransmission is not: its original committed, so 96 would be a lie."""
    card, other = network.cards[0], network.cards[1]
    async with (guarded_switch(switch, request_timeout_s=1.0, group_commit_writers=1) as running,
                on(running, network.terminal(0), "cup") as term):
        first = await term.accrue(card, 5000)
        assert first.rc == "00"
        blocker, tx = await _locked(switch.dsn, "SELECT 1 FROM cards WHERE card_index = $1 FOR UPDATE",
                                    network.card_index(other))
        term.timeout_s, term.reversal_on_timeout = 4.0, False
        try:
            # The one writer is held by an accrual on the locked card; the retransmission
            # and another accrual on that card wait and then make the next batch together.
            stalled = asyncio.create_task(term.accrue(other, 100))
            await asyncio.sleep(0.2)
            again = asyncio.create_task(term.send(first.request))
            await asyncio.sleep(0.05)
            neighbour = asyncio.create_task(term.accrue(other, 200))
            results = await asyncio.gather(stalled, again, neighbour, return_exceptions=True)
        finally:
            await tx.rollback()
            await blocker.close()
    assert [getattr(r, "rc", None) for r in (results[0], results[2])] == ["96", "96"], results
    again_rc = getattr(results[1], "rc", None)
    assert again_rc in (None, "00"), f"the retransmission of a committed accrual was answered {again_rc}"
    assert await network.balance(card) == 50 and await network.balance(other) == 0


async def test_a_request_whose_connection_closes_before_it_writes_is_given_up(switch, network):
    card = network.cards[0]
    async with guarded_switch(switch) as running:
        blocker, tx = await _locked(switch.dsn, "SELECT 1 FROM cards WHERE card_index = $1 FOR UPDATE",
                                    network.card_index(card))
        try:
            term = on(running, network.terminal(0), "cup")
            await term.connect()
            request = term.request("accrue", card, 5000)
            await term.send_raw(term.framing.frame(term.dialect.encode(request, sign=term._mac_fn())))
            await asyncio.sleep(0.3)
            await term.close()  # the terminal gave up: timed out, will try again elsewhere
            await asyncio.sleep(0.3)
        finally:
            await tx.rollback()
            await blocker.close()
        await asyncio.sleep(0.5)
    assert await network.balance(card) == 0, "the abandoned accrual never posted"
    assert await _count(switch.dsn, "SELECT count(*) FROM requests WHERE card_index = $1",
                        network.card_index(card)) == 0


async def test_a_sign_on_whose_connection_is_gone_does_not_issue_keys(switch, network):
    tid = network.terminal_ids[0]
    keys_issued = "SELECT keys_issued FROM terminals WHERE terminal_id = $1"
    async with guarded_switch(switch) as running:
        before = await _count(switch.dsn, keys_issued, tid)
        blocker, tx = await _locked(switch.dsn, "SELECT 1 FROM terminals WHERE terminal_id = $1 FOR UPDATE", tid)
        try:
            abandoned = on(running, network.terminal(0, sign_on=False), "cup")
            await abandoned.connect()
            sign_on = abandoned.base_fields("0800", "", "00", network_code="003")
            del sign_on["3"], sign_on["25"]
            await abandoned.send_raw(abandoned.framing.frame(abandoned.dialect.encode(sign_on)))
            await asyncio.sleep(0.3)
            await abandoned.close()
            await asyncio.sleep(0.3)
        finally:
            await tx.rollback()
            await blocker.close()
        await asyncio.sleep(0.5)
        after = await _count(switch.dsn, keys_issued, tid)
        async with on(running, network.terminal(0), "cup") as live:
            reply = await live.accrue(network.cards[0], 100)
    assert after == before, "the abandoned sign-on issued nothing"
    assert reply.rc == "00"


@contextlib.asynccontextmanager
async def slow_commit(dsn: str, account_id: int, sleep_s: float) -> AsyncIterator[None]:
    """COMMITs that post to ``account_id`` take ``sleep_s`` (a deferred trigger runs at
    COMMIT): a database that stalls exactly while a commit is under way."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(f"""
            CREATE OR REPLACE FUNCTION test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep({sleep_s}); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER test_slow_commit AFTER INSERT ON postings
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                WHEN (NEW.credit_account_id = {int(account_id)}) EXECUTE FUNCTION test_slow_commit();
        """)
        yield
    finally:
        await con.execute("DROP TRIGGER IF EXISTS test_slow_commit ON postings;"
                          " DROP FUNCTION IF EXISTS test_slow_commit()")
        await con.close()


async def _card_account(net: Network, card: str) -> int:
    return await _count(net.dsn, "SELECT account_id FROM cards WHERE card_index = $1", net.card_index(card))


async def test_a_commit_under_way_at_the_deadline_is_answered_with_its_outcome_not_96(switch, network):
    """The defect: a request whose COMMIT went through after its deadline was answered 96,
    and the terminal (which treats 96 as a decline) never reversed it."""
    card = network.cards[0]
    async with (guarded_switch(switch, request_timeout_s=0.5, commit_wait_s=5.0) as running,
                on(running, network.terminal(0), "cup") as term):
        assert (await term.echo()).rc == "00"
        async with slow_commit(switch.dsn, await _card_account(network, card), 1.5):
            reply = await term.accrue(card, 5000)
    assert reply.rc == "00", "it committed: the answer says so"
    assert await network.balance(card) == 50


async def test_a_commit_whose_outcome_never_comes_is_not_answered_and_the_reversal_settles_it(switch, network):
    card = network.cards[0]
    async with (guarded_switch(switch, request_timeout_s=0.5, commit_wait_s=0.5) as running,
                on(running, network.terminal(0), "cup") as term):
        term.timeout_s = 3.0
        async with slow_commit(switch.dsn, await _card_account(network, card), 2.0):
            request = term.request("accrue", card, 5000)
            with pytest.raises(TerminalError):
                await term.send(request)  # no answer: neither 00 nor a decline would be sure
        reversal = await term.reverse(request)  # what a terminal does with an unanswered request
    assert reversal.rc == "00"
    assert await network.balance(card) == 0, "posted or not, the reversal leaves nothing, exactly once"
    assert await network.invariants() == []


def _postgres_pids(sut: SwitchUnderTest) -> list[int]:
    """The test server's postmaster and every process it started."""
    postmaster = int((sut.data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == postmaster:
                children.append(int(entry))
    return [postmaster, *children]


@contextlib.contextmanager
def postgres_stopped(sut: SwitchUnderTest) -> Iterator[None]:
    """SIGSTOP every PostgreSQL process (a hung database), SIGCONT at the end whatever happens."""
    pids = _postgres_pids(sut)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def test_the_deadline_is_kept_while_the_database_hangs_and_nothing_posts_later(switch, network):
    """The defect: with PostgreSQL stopped, answers came at twice the request timeout
    (the cancelled transaction's rollback waited for the database). Now: an inquiry
    gets 96 at the deadline; an accrual, whose request key could not even be looked
    up (it might retransmit one that committed), gets no answer rather than a 96 that
    could lie; and nothing posts once the database resumes."""
    card = network.cards[0]
    async with (guarded_switch(switch, request_timeout_s=1.0) as running,
                on(running, network.terminal(0), "cup") as term):
        assert (await term.echo()).rc == "00"
        term.timeout_s = 2.5
        requests = [term.request("accrue", card, 1000 * (i + 1)) for i in range(3)]
        with postgres_stopped(switch):
            started = time.monotonic()
            inquiry = await term.inquiry(card)
            waited_s = time.monotonic() - started
            unanswered = await asyncio.gather(*(term.send(r) for r in requests), return_exceptions=True)
        await asyncio.sleep(1.0)
        after = await network.balance(card)
        term.timeout_s = 15
        again = await term.send(requests[0])
    assert inquiry.rc == "96" and waited_s < 2.0, f"answered {inquiry.rc} after {waited_s:.1f} s (1 s deadline)"
    assert all(isinstance(u, TerminalError) for u in unanswered), unanswered
    assert after == 0, "nothing was posted, also once the database resumed"
    assert again.rc == "00" and await network.balance(card) == 10


class DatabaseLink:
    """A TCP proxy in front of the test's PostgreSQL (unix socket): cutting it is a
    database that went away (connections reset, new ones refused); restoring it
    brings the database back."""

    def __init__(self, sut: SwitchUnderTest):
        self.socket = str(sut.data_dir / "pg" / ".s.PGSQL.5432")
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pairs: set[asyncio.StreamWriter] = set()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/pointswitch"

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for writer in list(self.pairs):
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.socket)
        self.pairs |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        self.pairs -= {writer, up_writer}


async def test_a_database_outage_is_logged_once_when_it_begins_and_once_when_it_ends(switch, network):
    """The defect: every failed request during an outage logged a ~4 KB traceback (137 MB
    in 140 s), and frames that got no answer were logged as transactions."""
    card = network.cards[0]
    link = DatabaseLink(switch)
    await link.up()
    captured = io.StringIO()
    async with (guarded_switch(switch, dsn=link.dsn) as running,
                on(running, network.terminal(0), "cup") as term):
        assert (await term.accrue(card, 100)).rc == "00"
        logs.configure("info", json=True, stream=captured)
        try:
            await link.cut()
            during = [(await term.inquiry(card)).rc for _ in range(20)]
            term.timeout_s = 0.5
            keyed = term.request("accrue", card, 100)
            with pytest.raises(TerminalError):  # its key cannot be looked up: no answer, not a 96
                await term.send(keyed)
            term.timeout_s = 15
            await link.up()
            after = None
            for _ in range(50):  # the pool opens new connections as they are needed
                after = (await term.accrue(card, 100)).rc
                if after == "00":
                    break
                await asyncio.sleep(0.1)
        finally:
            logs.configure("warning")
    events = [json.loads(line) for line in captured.getvalue().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert set(during) == {"96"} and after == "00"
    assert names.count("database unavailable: requests that need it are answered 96 until it is back") == 1
    assert names.count("database available again") == 1
    back = next(e for e in events if e["event"] == "database available again")
    assert back["failed_requests"] >= 20
    assert not [e for e in events if "exception" in e or "Traceback" in json.dumps(e)], "no traceback per request"
    assert all(e["event"] != "transaction" or e.get("rc") == "00" for e in events)
    assert await network.balance(card) == 2
