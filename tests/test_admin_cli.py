"""Operator commands and card data: masked output, ``--reveal``, the audit trail,
secrets read from standard input (never the command line), and a seed that
creates only what does not exist. Each command runs as its own process, as an
operator runs it."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import pwd
import select
import socket
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from pointswitch.simulators.terminal import TerminalClient

from .conftest import TEST_PIN
from .test_cli import PS, _cli

OS_USER = pwd.getpwuid(os.geteuid()).pw_name


def _env(switch) -> dict[str, str]:
    return {"POINTSWITCH_MASTER_KEY": switch.master_key_hex}


def _fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        con = await asyncpg.connect(dsn)
        try:
            return await con.fetch(sql, *args)
        finally:
            await con.close()

    return asyncio.run(run())


def _last_audit_id(dsn: str) -> int:
    return int(_fetch(dsn, "SELECT coalesce(max(audit_id), 0) AS n FROM audit_log")[0]["n"])


CARD, HOLDER, PHONE = "6288551234567890", "Murong Fu", "13511112222"
MASKED = "628855******7890"


def test_each_admin_command_leaves_exactly_its_audit_entry_and_shows_card_data_masked(switch):
    db, env = ["--dsn", switch.dsn], _env(switch)
    m, t, seed_m = "MAUD00000000001", "TAUD0001", "MAUD00000000002"
    steps: list[tuple[list[str], str | None, str | None, str | None]] = [
        # (command, standard input, audit action or None when nothing changes, audit target)
        (["merchant", "add", m, "--name", "Audit Shop", "--earn-rate", "1"], None, "merchant.add", m),
        (["merchant", "update", m, "--earn-rate", "2", "--status", "suspended"], None, "merchant.update", m),
        (["merchant", "update", m, "--status", "active"], None, "merchant.update", m),
        (["terminal", "add", t, "--merchant", m], None, "terminal.add", t),
        (["terminal", "rekey", t], None, "terminal.rekey", t),
        (["terminal", "profile", t, "--allow-single-des"], None, "terminal.profile", t),
        (["terminal", "disable", t], None, "terminal.disable", t),
        (["terminal", "enable", t], None, "terminal.enable", t),
        (["card", "add", CARD, "--name", HOLDER, "--phone", PHONE, "--pin", "-"], "246810\n", "card.add", MASKED),
        (["card", "block", CARD], None, "card.block", MASKED),
        (["card", "unblock", CARD], None, "card.unblock", MASKED),
        (["card", "set-pin", CARD, "--pin", "-"], "135790\n", "card.set_pin", MASKED),
        (["card", "unlock-pin", CARD], None, "card.unlock_pin", MASKED),
        (["card", "show", CARD, "--reveal"], None, "card.reveal", MASKED),
        (["seed", "--merchant", seed_m, "--terminals", "1", "--terminal-prefix", "AU", "--cards", "3",
          "--first-card", "6288550000000000"], None, "seed", seed_m),
        (["merchant", "list"], None, None, None),
        (["terminal", "list", "--merchant", m], None, None, None),
        (["card", "show", CARD], None, None, None),
        (["card", "show", CARD, "--json"], None, None, None),
        (["check"], None, None, None),
        (["connectors"], None, None, None),
        (["audit", "--limit", "3"], None, None, None),
    ]
    started = datetime.now(UTC)
    outputs = {}
    for args, stdin, action, target in steps:
        before = _last_audit_id(switch.dsn)
        result = _cli("admin", *args, *db, env=env, stdin=stdin)
        out = result.stdout + result.stderr
        outputs[" ".join(args)] = result.stdout
        new = _fetch(switch.dsn, "SELECT * FROM audit_log WHERE audit_id > $1 ORDER BY audit_id", before)
        assert [(e["action"], e["target"]) for e in new] == ([(action, target)] if action else []), args
        for e in new:
            assert e["actor"] == OS_USER, "the OS user who ran the command"
            assert e["origin"].startswith(socket.gethostname() + " pid "), e["origin"]
            assert not {"pin", "tmk", "card_number", "phone"} & set(json.loads(e["details"])), "no secret in details"
        if args[0] == "card" and "--reveal" in args:
            assert CARD in out and HOLDER in out and PHONE in out, "--reveal shows the card data"
        elif args[0] == "card":
            assert MASKED in out, args
            assert CARD not in out and HOLDER not in out and PHONE not in out, args
            assert "M***" in out and "***2222" in out, "holder and phone masked"
        assert "246810" not in out and "135790" not in out

    assert "revealed=False" in outputs[f"card show {CARD}"]
    listed = json.loads(_cli("admin", "audit", "--json", "--since", started.isoformat(), *db, env=env).stdout)
    assert [e["action"] for e in listed] == [a for _, _, a, _ in steps if a]
    assert all(e["actor"] == OS_USER for e in listed)
    seed_entry = listed[-1]["details"]
    assert (seed_entry["terminals_created"], seed_entry["cards_created"]) == (1, 3)
    last_two = json.loads(_cli("admin", "audit", "--json", "--limit", "2", *db, env=env).stdout)
    assert [e["action"] for e in last_two] == ["card.reveal", "seed"]
    assert "card.reveal" in _cli("admin", "audit", "--since", started.isoformat(), *db, env=env).stdout


def test_a_secret_on_the_command_line_is_refused_and_nothing_happens(switch):
    db, env = ["--dsn", switch.dsn], _env(switch)
    card, tmk = "6288553333444455", "0123456789ABCDEFFEDCBA9876543210"
    before = _last_audit_id(switch.dsn)
    refusals = [
        (["card", "add", card, "--name", "Ximen Chuixue", "--pin", "2468"], "--pin"),
        (["card", "set-pin", card, "--pin", "2468"], "--pin"),
        (["terminal", "add", "TSEC0001", "--merchant", "MT0000000000001", "--tmk", tmk], "--tmk"),
        (["terminal", "rekey", "TSEC0001", "--tmk", tmk], "--tmk"),
        (["seed", "--pin", "999999"], "--pin"),
        (["seed", "--tmk", tmk], "--tmk"),
    ]
    for args, option in refusals:
        result = _cli("admin", *args, *db, env=env, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert f"give {option} -" in result.stderr and "process list" in result.stderr, result.stderr
        assert "2468" not in result.stderr and tmk not in result.stderr and "999999" not in result.stderr
    assert _last_audit_id(switch.dsn) == before, "nothing was done"
    missing = _cli("admin", "card", "show", card, *db, env=env, check=False)
    assert missing.returncode == 1 and "no card 628855******4455" in missing.stderr
    empty = _cli("admin", "card", "add", card, "--name", "Ximen Chuixue", "--pin", "-", *db, env=env, check=False)
    assert empty.returncode == 1 and "no PIN on standard input" in empty.stderr


def _in_a_terminal(argv: list[str], env: dict[str, str], answer: str, prompt: bytes) -> tuple[int, bytes]:
    """Run ``argv`` with a pseudo-terminal as its controlling terminal; type ``answer``
    after ``prompt`` appears. Returns (exit code, everything the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        os.execve(argv[0], argv, env)
    shown, deadline, answered = b"", time.monotonic() + 60, False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            if not answered and prompt in shown:
                os.write(fd, answer.encode() + b"\n")
                answered = True
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown


async def test_a_secret_is_asked_for_without_echo_on_a_terminal(network, switch):
    card, new_pin = network.cards[2], "97531"
    argv = [*PS, "admin", "card", "set-pin", card, "--pin", "-", "--dsn", switch.dsn]
    env = {**os.environ, **_env(switch)}
    code, shown = await asyncio.to_thread(_in_a_terminal, argv, env, new_pin, b"PIN: ")
    assert code == 0, shown.decode(errors="replace")
    assert b"PIN: " in shown, "asked on the terminal"
    assert new_pin.encode() not in shown, "typed without echo"
    async with network.terminal(0) as term:
        new = await term.inquiry(card, pin=new_pin)
        old = await term.inquiry(card, pin=TEST_PIN)
    assert (new.rc, old.rc) == ("00", "55"), "the PIN typed at the prompt is the card's PIN"


def test_seed_creates_only_what_does_not_exist_and_never_touches_existing_terminals_or_cards(switch):
    db, env = ["--dsn", switch.dsn], _env(switch)
    seed = ["admin", "seed", "--merchant", "MSEED0000000001", "--terminal-prefix", "SD", "--first-card",
            "6288560000000000"]
    first = json.loads(_cli(*seed, "--terminals", "2", "--cards", "20", "--json", *db, env=env).stdout)
    assert (first["terminals_created"], first["cards_created"], first["merchant_created"]) == (2, 20, True)
    tmk = first["tmk"]
    _cli("admin", "card", "set-pin", "6288560000000000", "--pin", "-", *db, env=env, stdin="8642\n")
    keys_sql = "SELECT terminal_id, tmk_sealed, tmk_kcv FROM terminals WHERE terminal_id LIKE 'SD%' ORDER BY 1"
    pins_sql = "SELECT card_index, pin_hash FROM cards ORDER BY 1"
    keys = [tuple(r) for r in _fetch(switch.dsn, keys_sql)]
    pins = {r[0]: r[1] for r in _fetch(switch.dsn, pins_sql)}

    again = _cli(*seed, "--terminals", "2", "--cards", "20", *db, env=env)
    more = _cli(*seed, "--terminals", "3", "--cards", "25", "--json", *db, env=env)
    listed = _cli("admin", "terminal", "list", "--merchant", "MSEED0000000001", "--json", *db, env=env)
    grown = json.loads(more.stdout)

    assert "left as they are: the merchant, 2 terminals that exist (keys unchanged), 20 cards that exist" \
        " (PINs unchanged)" in again.stdout
    assert "terminals_created=0" in again.stdout and "cards_created=0" in again.stdout
    assert "terminal master key" not in again.stdout, "no terminal created, no key shown"
    assert (grown["terminals_created"], grown["terminals_skipped"]) == (1, 2)
    assert (grown["cards_created"], grown["cards_skipped"]) == (5, 20)
    assert grown["tmk"] != tmk
    for shown in (again.stdout + again.stderr, more.stdout + more.stderr, listed.stdout + listed.stderr):
        assert tmk not in shown, "a terminal's master key is shown when it is created, never again"
    assert [tuple(r) for r in _fetch(switch.dsn, keys_sql)][:2] == keys, "existing terminals keep their keys"
    after = {r[0]: r[1] for r in _fetch(switch.dsn, pins_sql)}
    assert {k: after[k] for k in pins} == pins, "existing cards keep their PINs"

    async def use() -> tuple[str, str, str]:
        async with TerminalClient("127.0.0.1", switch.ports["cup"], "SD000001", "MSEED0000000001",
                                  tmk=bytes.fromhex(tmk), default_pin="123456", sign_on_at_connect=True) as term:
            changed = await term.inquiry("6288560000000000", pin="8642")
            seeded = await term.inquiry("6288560000000019")
        async with TerminalClient("127.0.0.1", switch.ports["cup"], "SD000003", "MSEED0000000001",
                                  tmk=bytes.fromhex(grown["tmk"]), default_pin="123456",
                                  sign_on_at_connect=True) as term:
            added = await term.inquiry("6288560000000024")
        return changed.rc, seeded.rc, added.rc

    assert asyncio.run(use()) == ("00", "00", "00")


def test_terminal_profile_is_set_at_registration_and_changed_by_an_operator(switch):
    db, env = ["--dsn", switch.dsn], _env(switch)
    m, t = "MPRO00000000001", "TPRO0001"
    _cli("admin", "merchant", "add", m, "--name", "Profile Shop", "--earn-rate", "1", *db, env=env)
    added = json.loads(_cli("admin", "terminal", "add", t, "--merchant", m, "--dialect", "iso87", "--json",
                            *db, env=env).stdout)
    before = _last_audit_id(switch.dsn)
    changed = json.loads(_cli("admin", "terminal", "profile", t, "--dialect", "cup", "--mac", "ecb",
                              "--allow-single-des", "--json", *db, env=env).stdout)
    refused = _cli("admin", "terminal", "profile", t, "--mac", "rot13", *db, env=env, check=False)
    assert (added["dialect"], added["mac"], added["double_mak"]) == ("iso87", "x919", True), \
        "iso87 defaults to X9.19, which always has a double-length MAK"
    assert (changed["dialect"], changed["mac"], changed["single_des_allowed"]) == ("cup", "ecb", True)
    assert changed["session"] == "none", "a profile change withdraws the working keys"
    assert refused.returncode != 0
    actions = [r["action"] for r in _fetch(switch.dsn, "SELECT action FROM audit_log WHERE audit_id > $1", before)]
    assert actions == ["terminal.profile"]
