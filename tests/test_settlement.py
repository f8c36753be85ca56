"""Batch settlement (0500/0510) and batch upload (0320/0330), over TCP: the switch
owns the batch, a settlement closes it, a request in a closed batch gets 77, the
upload is reconciled against the host's log, and a peer that knows only a
terminal id cannot close a real terminal's batch."""

from __future__ import annotations

import json

import pytest

from pointswitch.codecs.subfields import (
    SettlementTotals,
    TotalsBlock,
    UploadRecord,
    parse_48_totals,
    parse_48_upload,
    parse_48_upload_end,
    render_48_upload,
    render_48_upload_end,
)
from pointswitch.ledger import batches

from .conftest import Network
from .test_admin_cli import _env
from .test_cli import _cli
from .test_hostile import attacker, attacker_address, guarded_switch, on


async def _fetchval(net: Network, sql: str, *args: object) -> object:
    con = await net.db()
    try:
        return await con.fetchval(sql, *args)
    finally:
        await con.close()


async def _current_batch(net: Network, terminal_id: str) -> int:
    return int(await _fetchval(net, "SELECT current_batch FROM terminals WHERE terminal_id = $1", terminal_id))


# -- pure sub-field helpers ------------------------------------------------------------------
def test_upload_records_render_and_parse_back():
    records = [UploadRecord(12, "6288800000000001", 1500), UploadRecord(999999, "6217000011112222333", 1, "00")]
    value = render_48_upload(records)
    assert value[:2] == "02" and len(value) == 82
    assert value[2:42] == "00" "000012" "00006288800000000001" "000000001500"
    assert parse_48_upload(value) == records
    assert parse_48_upload_end(render_48_upload_end(17)) == 17


@pytest.mark.parametrize("bad", ["", "00", "01" + "0" * 39, "09" + "0" * 360, "01" + "00000012" + "0" * 20 + "0" * 12,
                                 "01" + "0000001X" + "6288800000000001".zfill(20) + "0" * 12])
def test_malformed_upload_records_are_refused(bad):
    with pytest.raises(ValueError):
        parse_48_upload(bad)


@pytest.mark.parametrize("bad", ["", "123", "12345", "12a4"])
def test_malformed_upload_end_is_refused(bad):
    with pytest.raises(ValueError):
        parse_48_upload_end(bad)


def test_reconcile_names_every_kind_of_line():
    host = {1: {"card_index": "a", "card_display": "A", "amount_fen": 100, "operation": "accrue"},
            2: {"card_index": "a", "card_display": "A", "amount_fen": 200, "operation": "accrue"},
            3: {"card_index": "a", "card_display": "A", "amount_fen": 300, "operation": "redeem"},
            4: {"card_index": "a", "card_display": "A", "amount_fen": 400, "operation": "accrue"}}
    uploaded = {1: {"card_index": "a", "card_display": "A", "amount_fen": 100},
                2: {"card_index": "a", "card_display": "A", "amount_fen": 201},
                4: {"card_index": "b", "card_display": "B", "amount_fen": 400},
                5: {"card_index": "a", "card_display": "A", "amount_fen": 500}}
    kinds = {line["trace"]: line["kind"] for line in batches.reconcile(host, uploaded)}
    assert kinds == {1: "matched", 2: "amount_differs", 3: "host_only", 4: "card_differs", 5: "terminal_only"}


# -- settlement over TCP -----------------------------------------------------------------------
async def test_an_agreeing_settlement_closes_the_batch_and_the_next_sign_on_opens_the_next(network, dialect):
    card, other = network.cards[0], network.cards[1]
    tid = network.terminal_id(0, dialect)
    async with network.terminal(0, dialect) as term:
        a1 = await term.accrue(card, 10000)
        a2 = await term.accrue(card, 5000)
        await term.redeem(card, 20)
        await term.void(a1)  # credit 10000; a1 stays a debit (gross)
        await term.refund(a2, 1000)  # credit 1000
        reversed_one = await term.accrue(other, 7000)
        assert (await term.reverse(reversed_one.request)).approved  # left out on both sides
        await term.inquiry(card)  # not counted
        assert (await term.redeem(other, 10**9)).rc == "51"  # declined: not counted
        expected = TotalsBlock(10000 + 5000 + 20, 3, 10000 + 1000, 2)
        assert term.batch_totals() == expected
        settled = await term.settle()
        late = await term.accrue(card, 300)  # still batch 1: closed
        balance_before = await network.balance(card)
        await term.sign_on()
        after = await term.accrue(card, 400)
        old_void = await term.void(a2)  # void is same batch only
    assert settled.rc == "00" and settled.fields["t"] == "0510"
    totals = parse_48_totals(settled.fields["48"])
    assert (totals.domestic.result, totals.foreign.result) == (1, 1)
    assert totals.domestic == TotalsBlock(*[getattr(expected, f) for f in
                                            ("debit_amount_fen", "debit_count", "credit_amount_fen",
                                             "credit_count")], result=1)
    day = await _fetchval(network, "SELECT business_date FROM batch_settlements WHERE terminal_id = $1", tid)
    assert settled.fields["15"] == day.strftime("%m%d")  # type: ignore[attr-defined]
    assert late.rc == "77"
    if dialect == "cup":
        assert late.envelope.processing_requirement == 3, "77 asks the terminal to sign on again"
    assert await _fetchval(network, "SELECT count(*) FROM requests WHERE terminal_id = $1 AND trace = $2",
                           tid, int(late.request["11"])) == 0, "a 77 is not logged and posts nothing"
    assert balance_before == await network.balance(card) - 4
    assert term.batch == 2 and after.rc == "00" and after.request["60"][2:8] == "000002"
    assert old_void.rc == "22"
    assert await _current_batch(network, tid) == 2


async def test_a_disagreeing_settlement_is_answered_00_with_result_2_and_a_retransmission_gets_the_same(network):
    tid = network.terminal_id(0)
    async with network.terminal(0) as term:
        await term.accrue(network.cards[0], 2500)
        settled = await term.settle(TotalsBlock(2400, 1, 0, 0))
        again = await term.send(settled.request, mac=False)
        other_trace = await term.send(dict(settled.request, **{"11": "999000"}), mac=False)
        other_totals = await term.send(dict(settled.request, **{"48": SettlementTotals(
            TotalsBlock(1, 1, 0, 0), TotalsBlock()).render()}), mac=False)
    assert settled.rc == "00"
    assert parse_48_totals(settled.fields["48"]).domestic.result == 2
    assert {k: again.fields[k] for k in ("39", "15", "48")} == {k: settled.fields[k] for k in ("39", "15", "48")}
    assert other_trace.rc == "77", "a settlement of a batch that is not open, not a retransmission"
    assert other_totals.rc == "94"
    assert await _current_batch(network, tid) == 2, "closed once"
    assert await _fetchval(network, "SELECT count(*) FROM batch_settlements WHERE terminal_id = $1", tid) == 1
    row = await _fetchval(network, "SELECT row_to_json(s)::text FROM batch_settlements s WHERE terminal_id = $1", tid)
    s = json.loads(str(row))
    assert (s["host_debit_fen"], s["terminal_debit_fen"], s["agree"]) == (2500, 2400, False)


async def test_malformed_settlement_and_upload_fields_are_answered_30(network):
    async with network.terminal(0) as term:
        await term.accrue(network.cards[0], 100)
        short = term._batch_message("0500", "201", term.batch)
        short["48"] = "0" * 61
        result_set = term._batch_message("0500", "201", term.batch)
        result_set["48"] = SettlementTotals(TotalsBlock(100, 1, 0, 0, result=1), TotalsBlock()).render()
        replies = [await term.send(short, mac=False), await term.send(result_set, mac=False)]
        settled = await term.settle()
        bad_upload = term._batch_message("0320", "201", term.batch)
        bad_upload["48"] = "02" + "0" * 40
        bad_end = term._batch_message("0320", "207", term.batch)
        bad_end["48"] = "12"
        replies += [await term.send(bad_upload, mac=False), await term.send(bad_end, mac=False)]
    assert settled.rc == "00"
    assert [r.rc for r in replies] == ["30"] * 4
    assert [r.fields["t"] for r in replies] == ["0510", "0510", "0330", "0330"]


async def test_upload_reconciles_every_kind_of_line_and_a_retransmission_stores_nothing_twice(network):
    card, other = network.cards[0], network.cards[1]
    tid = network.terminal_id(0)
    async with network.terminal(0) as term:
        matched = await term.accrue(card, 1000)
        differs = await term.accrue(card, 2000)
        host_only = await term.accrue(other, 3000)
        card_differs = await term.accrue(card, 4000)
        settled = await term.settle()
        records = [UploadRecord(int(matched.trace), card, 1000), UploadRecord(int(differs.trace), card, 2001),
                   UploadRecord(int(card_differs.trace), other, 4000), UploadRecord(990001, card, 5000)]
        replies = await term.upload(records)
        again = await term.send(replies[0].request, mac=False)  # the records message once more
        end_again = await term.send(replies[-1].request, mac=False)
        late_records = term._batch_message("0320", "201", settled_batch := int(settled.request["60"][2:8]))
        late_records["48"] = render_48_upload([UploadRecord(990002, card, 1)])
        late = await term.send(late_records, mac=False)
    assert settled.rc == "00" and parse_48_totals(settled.fields["48"]).domestic.result == 1
    assert [r.rc for r in replies] == ["00", "00"] and replies[-1].request["60"][8:11] == "207"
    assert replies[0].fields["t"] == "0330"
    assert again.rc == "00" and end_again.rc == "00"
    assert late.rc == "22", "records after the end are refused"
    con = await network.db()
    try:
        shown = await batches.show_settlement(con, tid, settled_batch)
        stored = await con.fetchval("SELECT count(*) FROM batch_upload_records r JOIN batch_settlements s"
                                    " USING (settlement_id) WHERE s.terminal_id = $1", tid)
        clear = await con.fetchval("SELECT count(*) FROM batch_upload_records WHERE card_display = $1"
                                   " OR card_index = $1", card)
    finally:
        await con.close()
    assert shown is not None
    kinds = {line["trace"]: line["kind"] for line in shown["lines"]}
    assert kinds == {int(matched.trace): "matched", int(differs.trace): "amount_differs",
                     int(host_only.trace): "host_only", int(card_differs.trace): "card_differs",
                     990001: "terminal_only"}
    assert stored == 4 and shown["upload"]["messages"] == 1 and shown["upload"]["records_sent"] == 4
    assert clear == 0, "no clear card number stored"
    assert all(card not in json.dumps(line) for line in shown["lines"])
    assert shown["upload"]["reconciliation"]["matched"] == 1


async def test_the_simulators_own_upload_matches_and_admin_batch_commands_show_it(switch, network):
    tid = network.terminal_id(0)
    async with network.terminal(0) as term:
        for n in range(10):  # two records messages
            await term.accrue(network.cards[n % 3], 100 * (n + 1))
        settled = await term.settle()
        replies = await term.upload()
    assert settled.rc == "00" and [r.rc for r in replies] == ["00"] * 3
    db, env = ["--dsn", switch.dsn], _env(switch)
    listed = json.loads(_cli("admin", "batch", "list", "--terminal", tid, "--json", *db, env=env).stdout)
    shown = json.loads(_cli("admin", "batch", "show", tid, "1", "--json", *db, env=env).stdout)
    text = _cli("admin", "batch", "show", tid, "1", *db, env=env).stdout
    assert [(r["terminal"], r["batch"], r["agree"]) for r in listed] == [(tid, 1, True)]
    assert listed[0]["host_totals"]["debit_amount_fen"] == 5500
    assert shown["upload"]["reconciliation"]["matched"] == 10 and len(shown["lines"]) == 10
    assert all("*" in line["card"] for line in shown["lines"]), "card numbers masked"
    assert all(c not in text for c in network.cards) and "balanced" in text
    missing = _cli("admin", "batch", "show", tid, "7", *db, env=env, check=False)
    assert missing.returncode != 0 and "no settlement" in missing.stderr


async def test_upload_for_a_batch_not_just_settled_gets_77(network):
    async with network.terminal(0) as term:
        await term.accrue(network.cards[0], 100)
        message = term._batch_message("0320", "201", term.batch)
        message["48"] = render_48_upload([UploadRecord(1, network.cards[0], 100)])
        reply = await term.send(message, mac=False)
    assert reply.rc == "77"


# -- the attack: closing someone else's batch ---------------------------------------------------
async def test_a_forged_settlement_from_another_peer_is_refused_and_the_real_terminal_settles(switch, network):
    card = network.cards[0]
    tid = network.terminal_id(0)
    async with guarded_switch(switch) as running:
        async with on(running, network.terminal(0)) as real:
            await real.accrue(card, 1000)  # MAC-verified, from 127.0.0.1
            async with attacker(network, running, 0) as evil:
                evil.batch = real.batch
                forged = await evil.settle(TotalsBlock())
                evil.mak = bytes(8)  # a guessed key: the MAC does not verify
                forged_mac = await evil.send(dict(forged.request, **{"11": "000777"}), mac=True)
                evil.settled = (real.batch, True, [])
                forged_upload = (await evil.upload())[-1]
            assert await _current_batch(network, tid) == 1, "nothing changed"
            still = await real.accrue(card, 500)
            settled = await real.settle()
        # A terminal that opens a new connection per transaction, from its own address: accepted.
        async with on(running, network.terminal(1, sign_on=True, local_host=(addr := attacker_address()))) as t1:
            await t1.accrue(card, 100)
        async with on(running, network.terminal(1, sign_on=False, local_host=addr)) as t1_again:
            t1_again.batch = 1
            next_connection = await t1_again.settle(TotalsBlock(100, 1, 0, 0))
    assert (forged.rc, forged_mac.rc, forged_upload.rc) == ("A0", "A0", "A0")
    assert forged.envelope.processing_requirement == 3
    assert still.rc == "00" and settled.rc == "00"
    assert parse_48_totals(settled.fields["48"]).domestic.result == 1
    assert next_connection.rc == "00"
    assert await _current_batch(network, tid) == 2


async def test_settlements_of_one_terminal_are_rate_limited(switch, network):
    async with guarded_switch(switch) as running, on(running, network.terminal(0)) as term:
        await term.accrue(network.cards[0], 100)
        codes = []
        for _ in range(8):
            wrong_batch = term._batch_message("0500", "201", 999)
            wrong_batch["48"] = SettlementTotals(TotalsBlock(), TotalsBlock()).render()
            codes.append((await term.send(wrong_batch, mac=False)).rc)
    assert codes[:6] == ["77"] * 6 and codes[6:] == ["65", "65"]


def test_the_worked_example_of_the_integrator_guide_encodes_and_decodes():
    """docs/integrator.md 3.14: the 0500 and the end of the upload, byte for byte."""
    from pathlib import Path

    from pointswitch.codecs import dialect, framing

    cup, binary2 = dialect("cup"), framing("binary2")
    doc = Path(__file__).parent.parent.joinpath("docs", "integrator.md").read_text()
    settle = {"t": "0500", "11": "000009", "41": "T0000001", "42": "M00000000000001", "49": "156",
              "48": SettlementTotals(TotalsBlock(51550, 2, 51250, 1), TotalsBlock()).render(), "60": "00000001201"}
    end = {"t": "0320", "11": "000011", "41": "T0000001", "42": "M00000000000001", "48": "0002",
           "60": "00000001207"}
    for fields in (settle, end):
        frame = binary2.frame(cup.encode(fields))
        assert cup.decode(frame[2:]).fields == fields
        text = frame.hex(" ").upper()
        lines = [text[i:i + 48].strip() for i in range(0, len(text), 48)]
        assert "\n".join(lines) in doc
